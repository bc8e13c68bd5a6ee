"""The synthetic checkpoint writer (benchmarks/capped_run.py): what it writes is what loads."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from moepress.testing import tiny_config
from moepress.arch.checkpoint import CheckpointReader
from moepress.arch.families import FAMILIES
from moepress.testing.synthetic import qwen3_30b_a3b_config, synthetic_state_dict, write_synthetic_checkpoint


@pytest.mark.parametrize("layout", ["hub", "fused"])
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_written_checkpoint_loads_with_identical_weights(tmp_path, family, layout):
    config = tiny_config(family, num_layers=3)
    path = tmp_path / "ckpt"
    write_synthetic_checkpoint(config, path, dtype=torch.bfloat16, std=0.05, seed=3, layout=layout)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3 + 2  # embed, one shard per layer, final
    keys = index["weight_map"]
    if layout == "hub":  # the hub's per-expert names, as the real checkpoints have them
        block = FAMILIES[family].hub_block
        assert f"model.layers.0.{block}.experts.7.{FAMILIES[family].hub_expert_names[1]}.weight" in keys
        assert not any(k.endswith("gate_up_proj") for k in keys)
    else:
        assert "model.layers.2.mlp.experts.gate_up_proj" in keys

    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                                     output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    expected = synthetic_state_dict(config, dtype=torch.bfloat16, std=0.05, seed=3)
    got = loaded.state_dict()
    assert set(expected) == set(got)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    # a model built the ordinary way with the same weights computes the same logits
    built = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    built.load_state_dict(expected)
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, built.eval()(ids).logits)
    # the streaming reader answers the in-memory names from the files
    reader = CheckpointReader(path, FAMILIES[family])
    assert torch.equal(reader.tensor("model.layers.1.mlp.experts.gate_up_proj"),
                       expected["model.layers.1.mlp.experts.gate_up_proj"])


def test_weights_depend_on_seed_and_expert(tmp_path):
    config = tiny_config("qwen3_moe", num_layers=1)
    a = synthetic_state_dict(config, seed=0)
    b = synthetic_state_dict(config, seed=1)
    w = a["model.layers.0.mlp.experts.down_proj"]
    assert not torch.equal(w, b["model.layers.0.mlp.experts.down_proj"])
    assert not torch.equal(w[0], w[1])  # each expert has its own stream
    assert torch.equal(a["model.norm.weight"], torch.ones_like(a["model.norm.weight"]))
    assert 0.015 < w.float().std().item() < 0.025


def test_refuses_existing_directory_and_leaves_no_temp(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(FileExistsError):
        write_synthetic_checkpoint(tiny_config("qwen3_moe", num_layers=1), tmp_path / "ckpt")
    with pytest.raises(ValueError):
        write_synthetic_checkpoint(tiny_config("qwen3_moe", num_layers=1), tmp_path / "other", layout="x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_qwen3_30b_a3b_shapes():
    """The real model's dimensions (meta device: nothing allocated)."""
    config = qwen3_30b_a3b_config(num_layers=4)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    experts = model.model.layers[0].mlp.experts
    assert tuple(experts.gate_up_proj.shape) == (128, 2 * 768, 2048)
    assert tuple(model.model.layers[0].self_attn.k_proj.weight.shape) == (4 * 128, 2048)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    total = sum(p.numel() for p in model.parameters())
    assert 3.0e9 < total < 3.3e9  # 4 layers of ~623 M + two 311 M embedding matrices


@pytest.mark.parametrize("layout", ["hub", "fused"])
def test_reader_copies_experts_in_place(tmp_path, layout):
    """`CheckpointReader.copy_into` (the streaming loader's path) fills a fused fp32 tensor from
    either layout, cast exactly, without building the fused tensor first."""
    config = tiny_config("qwen3_moe", num_layers=1)
    write_synthetic_checkpoint(config, tmp_path / "c", std=0.05, layout=layout)
    expected = synthetic_state_dict(config, std=0.05)
    reader = CheckpointReader(tmp_path / "c", FAMILIES["qwen3_moe"])
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj",
                 "model.layers.0.mlp.gate.weight"):
        dest = torch.full(expected[name].shape, float("nan"))
        reader.copy_into(name, dest)
        assert torch.equal(dest, expected[name].float()), name
    with pytest.raises(KeyError):
        reader.copy_into("model.layers.5.mlp.experts.down_proj", torch.empty(8, 64, 48))
