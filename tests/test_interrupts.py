"""Ctrl-C and SIGTERM during `moepress compress` (issue 20): one line saying what was kept and the
command that resumes, exit 130 / 143, no lock left; the printed command then completes the run
and its result equals an uninterrupted one."""

from __future__ import annotations

import json
import os
import shlex
import signal
import time

import torch
from typer.testing import CliRunner

import moepress
from moepress import cli
from moepress.cli import errors as cli_errors
from moepress.run import store as layer_store

from test_concurrent_runs import start_held, tree_hash


def _ids():
    return torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))


def _sigterm_after_layer_0(monkeypatch):
    """SIGTERM to this very process once layer 0 is stored; returns the original `offload`."""
    stored = layer_store.StreamingLayers.offload

    def offload(self, index, record=None):
        stored(self, index, record)
        if index == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(layer_store.StreamingLayers, "offload", offload)
    return stored


def _args(src, calib_file, out) -> list[str]:
    return ["compress", str(src), "-m", "reap", "--ratio", "0.5", "--calib", str(calib_file), "--samples", "4",
            "--seq-len", "32", "-o", str(out), "--quiet"]


def test_ctrl_c_says_what_was_kept_and_the_printed_command_resumes(tiny_checkpoint, calib_file, tmp_path):
    src = tiny_checkpoint("mixtral")
    source_hash = tree_hash(src)
    proc = start_held(tmp_path, _args(src, calib_file, tmp_path / "out"), tmp_path / "hold")  # layer 0 stored
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    printed = [line for line in (stdout + stderr).splitlines() if line.strip()]
    assert len(printed) == 1, printed
    assert printed[0].startswith(f"interrupted: 1 of 2 layers kept in {tmp_path / '.out.work'}; resume with: "
                                 f"moepress compress {src} "), printed[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.lock").exists()
    assert len(json.loads((tmp_path / ".out.work" / "progress.json").read_text())["layers"]) == 1

    command = shlex.split(printed[0].split("resume with: ", 1)[1])
    assert command[0] == "moepress"
    rerun = CliRunner().invoke(cli.app, command[1:])  # the same CLI, in this process (one start less)
    assert rerun.exit_code == 0, rerun.output
    assert "resumed: 1 finished layer(s)" in rerun.output
    assert not (tmp_path / ".out.work").exists() and not (tmp_path / ".out.lock").exists()

    reference = moepress.compress(src, "reap", 0.5, calib=calib_file, samples=4, seq_len=32, offload=False)
    record = json.loads((tmp_path / "out" / "moepress.json").read_text())
    assert {k: v["kept"] for k, v in record["layers"].items()} == \
        {str(k): v["kept"] for k, v in reference.records.items()}
    with torch.no_grad():
        diff = (moepress.load(tmp_path / "out")(_ids()).logits - reference.model(_ids()).logits).abs().max()
    assert diff <= 1e-5
    assert tree_hash(src) == source_hash


def test_sigterm_says_what_was_kept_and_exits_143(tiny_checkpoint, calib_file, tmp_path, monkeypatch):
    """SIGTERM (a scheduler's kill, torchrun ending the other ranks) is sent to this very process once
    layer 0 is stored; the CLI's handler turns it into the same one-line ending."""
    _sigterm_after_layer_0(monkeypatch)
    previous = signal.getsignal(signal.SIGTERM)
    res = CliRunner().invoke(cli.app, _args(tiny_checkpoint("mixtral"), calib_file, tmp_path / "out"))
    assert res.exit_code == 143, res.output
    printed = [line for line in res.output.splitlines() if line.strip()]
    assert len(printed) == 1 and printed[0].startswith(
        f"terminated: 1 of 2 layers kept in {tmp_path / '.out.work'}; resume with: moepress compress "), printed
    assert signal.getsignal(signal.SIGTERM) == previous  # the handler was the command's only
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.lock").exists()


def test_a_signal_during_the_save_waits_for_the_save(capsys):
    """A save stopped midway would lose the finished layers it is moving into the checkpoint."""
    with cli_errors.signals_deferred("the save of OUT"):
        assert signal.getsignal(signal.SIGINT) not in (signal.default_int_handler, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert capsys.readouterr().err.splitlines() == ["SIGINT received: finishing the save of OUT first"]


def test_a_work_directory_from_moepress_0_1_resumes(tiny_checkpoint, calib_file, tmp_path, monkeypatch):
    """moepress 0.1 wrote a finished stock layer's block as `{"experts": m}` in progress.json; the run
    key has no code version, so today's run adopts that directory and must rebuild the layer from it."""
    src = tiny_checkpoint("mixtral")
    stored = _sigterm_after_layer_0(monkeypatch)
    assert CliRunner().invoke(cli.app, _args(src, calib_file, tmp_path / "out")).exit_code == 143
    monkeypatch.setattr(layer_store.StreamingLayers, "offload", stored)
    progress = tmp_path / ".out.work" / "progress.json"
    state = json.loads(progress.read_text())
    kept = state["layers"]["0"]["block"]["num_experts"]
    assert state["layers"]["0"]["block"] == {"kind": "experts", "num_experts": kept}
    state["layers"]["0"]["block"] = {"experts": kept}  # the 0.1 form
    progress.write_text(json.dumps(state))

    rerun = CliRunner().invoke(cli.app, _args(src, calib_file, tmp_path / "out"))
    assert rerun.exit_code == 0, rerun.output
    assert "resumed: 1 finished layer(s)" in rerun.output
    reference = moepress.compress(src, "reap", 0.5, calib=calib_file, samples=4, seq_len=32, offload=False)
    with torch.no_grad():
        diff = (moepress.load(tmp_path / "out")(_ids()).logits - reference.model(_ids()).logits).abs().max()
    assert diff <= 1e-5
