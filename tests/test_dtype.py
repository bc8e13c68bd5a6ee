"""Outputs keep the source's dtype (issue 12): an fp16 or bf16 model comes back in fp16 / bf16 for every
registered method, the dtype is recorded, and the checkpoint shrinks by exactly the parameters removed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import moepress
from moepress.testing import tiny_model
from moepress.cli import app
from moepress.methods import available_methods

OPTIONS = {"mergemoe": {"tokens": "all"}}  # as in test_registry_table: full-rank least squares on 128 tokens
CALIBRATION = {"samples": 4, "seq_len": 32}


def float_tensor_bytes(directory: Path) -> tuple[int, set[torch.dtype]]:
    """Bytes of the floating tensors in a checkpoint's safetensors files, and their dtypes."""
    total, dtypes = 0, set()
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as fh:
            for key in fh.keys():
                tensor = fh.get_tensor(key)
                if tensor.is_floating_point():
                    total += tensor.numel() * tensor.element_size()
                    dtypes.add(tensor.dtype)
    return total, dtypes


@pytest.fixture(scope="module")
def low_precision_source(tmp_path_factory, tokenizer):
    """`low_precision_source(dtype)`: a tiny Mixtral saved in `dtype` with its tokenizer (cached)."""
    cache = {}

    def make(dtype):
        if dtype not in cache:
            path = tmp_path_factory.mktemp(f"tiny-{dtype}".replace("torch.", ""))
            tiny_model("mixtral").to(dtype).save_pretrained(path)
            tokenizer.save_pretrained(path)
            cache[dtype] = path
        return cache[dtype]

    return make


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("method", list(available_methods()))
def test_output_keeps_the_source_dtype(method, dtype, low_precision_source, calib_file, tmp_path):
    src = low_precision_source(dtype)
    name = str(dtype).removeprefix("torch.")
    result = moepress.compress(src, method, 0.5, calib=calib_file, **CALIBRATION, **OPTIONS.get(method, {}))
    out = result.save(tmp_path / "out")

    src_bytes, src_dtypes = float_tensor_bytes(src)
    out_bytes, out_dtypes = float_tensor_bytes(out)
    assert src_dtypes == {dtype} and out_dtypes == {dtype}
    assert json.loads((out / "config.json").read_text())["dtype"] == name
    assert json.loads((out / "moepress.json").read_text())["dtype"] == name
    before, after = result.record["parameters"]["before"]["total"], result.record["parameters"]["after"]["total"]
    assert src_bytes - out_bytes == (before - after) * dtype.itemsize
    if after < before:
        assert sum(p.stat().st_size for p in out.glob("*.safetensors")) < (src / "model.safetensors").stat().st_size
    reloaded = moepress.load(out, dtype="auto")
    assert {p.dtype for p in reloaded.parameters() if p.is_floating_point()} == {dtype}
    with torch.no_grad():
        assert torch.isfinite(reloaded(torch.randint(0, 512, (1, 8))).logits).all()


def test_dtype_flag_overrides_the_source_dtype(low_precision_source, calib_file, tmp_path):
    src = low_precision_source(torch.bfloat16)
    res = CliRunner().invoke(app, ["compress", str(src), "-m", "reap", "--ratio", "0.25", "--calib", str(calib_file),
                                   "--samples", "4", "--seq-len", "32", "--dtype", "float32", "-o",
                                   str(tmp_path / "o"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert float_tensor_bytes(tmp_path / "o")[1] == {torch.float32}
    record = json.loads((tmp_path / "o" / "moepress.json").read_text())
    assert record["dtype"] == "float32" and record["offload"] is True
    index = json.loads((tmp_path / "o" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == float_tensor_bytes(tmp_path / "o")[0]


def test_outputs_follow_the_umask(tiny_checkpoint, calib_file, tmp_path):
    """Colleagues on a shared server can read a checkpoint: modes follow the umask, not mkdtemp's 0700."""
    import os

    old = os.umask(0o022)
    try:
        result = moepress.compress(tiny_checkpoint("olmoe"), "reap", 0.25, calib=calib_file, **CALIBRATION)
        out = result.save(tmp_path / "o")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o644}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_auto_follows_the_stored_weights_when_the_config_says_float32(dtype, low_precision_source, calib_file,
                                                                       tmp_path):
    """Issue 20: a config that says float32 over half-precision files (as the zoo asset's once did) must
    not make a "50 %" output larger than its source; the record says the two disagreed, and `quantize`
    compares bytes on disk with bytes on disk."""
    from moepress.loading import dtype_disagreement, source_dtype, tensor_bytes_on_disk

    src = tmp_path / "src"
    src.mkdir()
    for path in low_precision_source(dtype).iterdir():
        (src / path.name).write_bytes(path.read_bytes())
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "dtype": "float32"}))
    name = str(dtype).removeprefix("torch.")
    assert source_dtype(src) == dtype
    assert dtype_disagreement(src) and name in dtype_disagreement(src)

    res = CliRunner().invoke(app, ["compress", str(src), "-m", "reap", "--ratio", "0.5", "--calib", str(calib_file),
                                   "--samples", "4", "--seq-len", "32", "-o", str(tmp_path / "o"), "--quiet"])
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "o" / "moepress.json").read_text())
    assert record["dtype"] == name and "float32" in record["source_dtype_note"]
    assert float_tensor_bytes(tmp_path / "o")[1] == {dtype}
    assert tensor_bytes_on_disk(tmp_path / "o") < tensor_bytes_on_disk(src)

    res = CliRunner().invoke(app, ["quantize", str(src), "--scheme", "int8", "--out", str(tmp_path / "q")])
    assert res.exit_code == 0, res.output
    quant = json.loads((tmp_path / "q" / "moepress.json").read_text())["quantization"]
    assert quant["model_bytes_before"] == tensor_bytes_on_disk(src)
    assert quant["model_bytes_after"] == tensor_bytes_on_disk(tmp_path / "q")


def test_auto_evaluates_a_half_precision_checkpoint_in_float32_on_a_cpu(low_precision_source):
    """Outputs keep the stored dtype, but evaluation on a CPU runs half-precision weights in float32
    (slow and, for float16, lossy matmuls otherwise); an explicit dtype is obeyed."""
    from moepress.loading import evaluation_dtype

    src = low_precision_source(torch.bfloat16)
    assert evaluation_dtype("auto", src, "cpu") == torch.float32
    assert evaluation_dtype("auto", src, "cuda") == torch.bfloat16
    assert evaluation_dtype("bfloat16", src, "cpu") == torch.bfloat16
    report = moepress.evaluate(src, ppl=["heldout:linux"], seq_len=32)
    assert report.metrics["ppl/heldout:linux"] > 1
