"""Checkpoints are written in the family's hub layout (modeling/moepress_layout.py).

The reference for "hub layout" is what transformers' own `save_pretrained` writes by default for a
fresh stock model of the same config: the per-expert names vLLM, SGLang and transformers 4 read.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

import moepress
from moepress.arch import SUPPORTED as FAMILIES
from moepress.testing import tiny_model

CALIBRATION = {"samples": 4, "seq_len": 32}


def disk_keys(path: Path) -> set[str]:
    """Tensor names stored in a checkpoint directory (single file or sharded)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return set(json.loads(index.read_text())["weight_map"])
    with safe_open(str(path / "model.safetensors"), "pt") as fh:
        return set(fh.keys())


def stock_hub_keys(config, tmp_path: Path) -> set[str]:
    """The names transformers' `save_pretrained` writes by default for a fresh stock model of `config`."""
    config = transformers.AutoConfig.for_model(**{k: v for k, v in config.to_dict().items()
                                                  if k not in ("moepress", "auto_map", "architectures")})
    model = transformers.AutoModelForCausalLM.from_config(config)
    out = tmp_path / "reference"
    model.save_pretrained(out)
    return disk_keys(out)


@pytest.fixture(scope="module")
def fused_checkpoint(tmp_path_factory, tokenizer):
    """`fused_checkpoint(family)`: a tiny model saved with transformers 5's in-memory (fused) names."""
    cache = {}

    def make(family):
        if family not in cache:
            path = tmp_path_factory.mktemp(f"fused-{family}")
            tiny_model(family).save_pretrained(path, save_original_format=False)
            tokenizer.save_pretrained(path)
            cache[family] = path
        return cache[family]

    return make


@pytest.mark.parametrize("offload", [False, True], ids=["in-memory", "streamed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_stock_output_is_written_in_the_hub_layout(family, offload, fused_checkpoint, calib_file, tmp_path):
    """A pruned output of a source stored fused (where `save_pretrained` alone would keep fused names)
    carries exactly the names of the family's default `save_pretrained`, and reloads as the result."""
    result = moepress.compress(fused_checkpoint(family), "reap", ratio=0.5, calib=calib_file, offload=offload,
                               **CALIBRATION)
    ids = torch.arange(24).reshape(2, 12)
    expected = result.model(ids).logits if not offload else None
    out = result.save(tmp_path / "out")
    config = transformers.AutoConfig.from_pretrained(out)
    assert disk_keys(out) == stock_hub_keys(config, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.model.layers[-1].mlp.experts.gate_up_proj.shape[0] == 4
    if expected is not None:
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "phimoe"])
def test_custom_output_keeps_the_hub_names_of_the_stock_parts(family, tiny_checkpoint, calib_file, tmp_path):
    """Merging layer 1 only: layer 0 (untouched, stock) and everything the family's code owns keep the
    hub names; the custom block's tensors sit under the family's hub block name; both readers load it."""
    src = tiny_checkpoint(family)
    result = moepress.compress(src, "mergemoe", ratio=0.5, calib=calib_file, offload=False, layers="1",
                               tokens="all", **CALIBRATION)
    ids = torch.arange(24).reshape(2, 12)
    expected = result.model(ids).logits
    out = result.save(tmp_path / "out")
    keys = disk_keys(out)
    hub = stock_hub_keys(transformers.AutoConfig.from_pretrained(src), tmp_path)
    custom_layer = "model.layers.1."
    assert {k for k in keys if not k.startswith(custom_layer)} == {k for k in hub if not k.startswith(custom_layer)}
    hub_block = {"mixtral": "block_sparse_moe", "phimoe": "block_sparse_moe"}.get(family, "mlp")
    block_keys = {k for k in keys if k.startswith(custom_layer) and ("experts" in k or "expert_map" in k
                                                                      or "gate_up" in k)}
    assert block_keys and all(k.startswith(f"{custom_layer}{hub_block}.") for k in block_keys)
    for reloaded in (moepress.load(out),
                     transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()):
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_fused_custom_checkpoints_of_earlier_versions_still_load(tiny_checkpoint, calib_file, tmp_path):
    """moepress 0.1 wrote custom checkpoints with fused keys: they load as before."""
    result = moepress.compress(tiny_checkpoint("mixtral"), "mergemoe", ratio=0.5, calib=calib_file, offload=False,
                               tokens="all", **CALIBRATION)
    ids = torch.arange(24).reshape(2, 12)
    expected = result.model(ids).logits
    out = result.save(tmp_path / "out")
    model = moepress.load(out)
    model.save_pretrained(tmp_path / "fused", save_original_format=False)
    for name in ("moepress.json", *[p.name for p in out.glob("*.py")]):
        (tmp_path / "fused" / name).write_bytes((out / name).read_bytes())
    assert any(k.endswith("mlp.gate_up_proj") for k in disk_keys(tmp_path / "fused"))
    torch.testing.assert_close(moepress.load(tmp_path / "fused")(ids).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,options", [("moe_i2", {}), ("reap", {"quantize": "int8"})], ids=["moe_i2", "reap+int8"])
def test_resident_custom_outputs_name_the_moepress_class(method, options, tiny_checkpoint, calib_file, tmp_path):
    """`architectures` decides the class engines build: a custom checkpoint saved from memory (where
    `save_pretrained` would write the stock class's name) names the moepress class."""
    from moepress.modeling.modeling_moepress import class_name_for

    result = moepress.compress(tiny_checkpoint("qwen3_moe"), method, ratio=0.5, calib=calib_file, offload=False,
                               **CALIBRATION, **options)
    out = result.save(tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [class_name_for("qwen3_moe")]
    assert config["auto_map"]["AutoModelForCausalLM"].endswith(class_name_for("qwen3_moe"))
