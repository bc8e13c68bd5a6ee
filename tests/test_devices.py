"""`--device` / `device=`: selection, a clear early error without a GPU, and CPU placement honoured."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import moepress
from moepress.cli import app
from moepress.devices import DeviceError, resolve_device
from moepress.run.pipeline import hidden_placement

runner = CliRunner()


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_auto_and_cpu_without_a_gpu(no_gpu):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(DeviceError, match="no GPU visible"):
            resolve_device(spec)


def test_auto_picks_this_ranks_gpu_and_indices_are_checked(two_gpus, monkeypatch):
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "1")  # under torchrun: the rank's own GPU
    assert resolve_device("cuda") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match="sees 2 GPU"):
        resolve_device("cuda:2")
    with pytest.raises(DeviceError, match="must be a number"):
        resolve_device("cuda:x")
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        resolve_device("tpu")


def test_hidden_placement():
    h = [torch.zeros(2, 3)]
    assert hidden_placement(h, None, "auto") is None  # nothing moves
    assert hidden_placement(h, torch.device("cpu"), "device") == torch.device("cpu")
    assert hidden_placement(h, None, "cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="'auto', 'cpu' or 'device'"):
        hidden_placement(h, None, "gpu")


def test_compress_on_cpu_records_its_device_and_matches_the_default(tiny_checkpoint, calib_file):
    src = str(tiny_checkpoint("qwen3_moe"))
    settings = dict(calib=str(calib_file), samples=4, seq_len=32, offload=False)
    explicit = moepress.compress(src, "reap", 0.5, device="cpu", hidden_on="cpu", **settings)
    default = moepress.compress(src, "reap", 0.5, **settings)
    assert explicit.record["device"] == "cpu" and explicit.record["world_size"] == 1
    assert default.record["device"] == str(resolve_device("auto"))
    if default.record["device"] == "cpu":
        for (k, a), b in zip(explicit.model.state_dict().items(), default.model.state_dict().values()):
            assert torch.equal(a, b), k


@pytest.mark.parametrize("command", ["compress", "eval", "inspect", "bench", "finetune"])
def test_cuda_without_a_gpu_is_one_line_and_exit_2_before_any_work(command, no_gpu, tiny_checkpoint, tmp_path):
    src = str(tiny_checkpoint("mixtral"))
    out = tmp_path / "out"
    args = {"compress": ["compress", src, "-m", "reap", "--ratio", "0.5", "--out", str(out)],
            "eval": ["eval", src, "--ppl", "calib"],
            "inspect": ["inspect", src],
            "bench": ["bench", src, "--out", str(out)],
            "finetune": ["finetune", src, "--out", str(out)]}[command]
    res = runner.invoke(app, [*args, "--device", "cuda"])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "no GPU visible to torch" in lines[0], res.output
    assert not out.exists()  # refused before anything was written


def test_torchrun_record_is_not_read_from_a_single_process(tiny_checkpoint, calib_file, tmp_path):
    """Outside torchrun the API runs as one rank and says so in moepress.json."""
    result = moepress.compress(str(tiny_checkpoint("mixtral")), "frequency", 0.5, calib=str(calib_file),
                               samples=2, seq_len=32, device="cpu", out=tmp_path / "o")
    record = json.loads((result.save() / "moepress.json").read_text())
    assert record["world_size"] == 1 and record["device"] == "cpu"
