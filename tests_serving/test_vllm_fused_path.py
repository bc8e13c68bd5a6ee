"""Remapped and per-layer-count layers are served on vLLM's own FusedMoE layers, and exactly.

`moepress.serving.vllm_models` serves the layers of kind "remap" (MergeMoE & co.) and "experts"
(per-layer expert counts) of Mixtral, Qwen3-MoE, Qwen2-MoE and OLMoE on vLLM's FusedMoE (its fused
CPU kernel), every other kind through moepress's block as an opaque op. Here vLLM reports how each
layer of a served model is built (`vllm_generate --describe`), and a checkpoint in which every
token's top-2 picks two original experts of one merged expert (twin router rows mapped to one
merged expert) is served as transformers computes it. `test_vllm_parity.py` checks the tokens of
every variant; this file checks that the fused path is the one taken.

Needs vLLM's CPU build in its own venv with moepress installed into it (`make vllm-venv`), named by
`MOEPRESS_VLLM_PYTHON`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moepress
from moepress.zoo import reference_model_path

import test_vllm_parity as parity

# pruning one layer of two: a per-layer expert count (kind "experts") on the random sources, whose
# `--budget auto` keeps one count for both layers (a stock output)
VARIANTS = {**parity.VARIANTS, "reap+layers": ("reap", {"layers": "1"})}
# checkpoints whose listed layers are served on FusedMoE, and ones whose layers keep the opaque op
FUSED = [("mixtral-ref", "mergemoe"), ("mixtral-ref", "reap+budget-auto"), ("mixtral-ref", "mergemoe+layers"),
         ("qwen3", "mergemoe"), ("qwen3", "reap+layers"), ("qwen2_moe", "mergemoe"), ("qwen2_moe", "reap+layers"),
         ("olmoe", "mergemoe"), ("olmoe", "reap+layers")]
OPAQUE = [("mixtral-ref", "reap+int8"), ("mixtral-ref", "d2moe")]
TWINS = "mixtral-ref-mergemoe-twins"


def _compress(root: Path, source_name: str, variant: str) -> Path:
    """The checkpoint `test_vllm_parity` serves for (source, variant), under the same name (so
    `MOEPRESS_SERVING_WORK` shares them)."""
    if source_name == "mixtral-ref":
        source = reference_model_path("mixtral-ref")
    else:
        source = root / f"{source_name}-src"
        if not (source / "config.json").exists():
            parity._random_source(source_name, source)
    out = root / f"{source_name}-{variant}"
    if not (out / "moepress.json").exists():
        method, options = VARIANTS[variant]
        options = {**parity.OPTIONS.get(method, {}), **options}
        moepress.compress(str(source), method, ratio=0.5, **parity.CALIBRATION, **options).save(out)
    return out


def _twins(merged: Path, out: Path) -> Path:
    """`merged` (8 experts onto 4) with router rows 2j+1 := 2j and `expert_map = [0, 0, 1, 1, ...]`:
    every token's top-2 is a pair of equal logits that lands on one merged expert twice."""
    shutil.copytree(merged, out)
    for file in sorted(out.glob("layer-*.safetensors")):
        tensors = load_file(file)
        for name in list(tensors):
            if name.endswith(".gate.weight"):
                gate = tensors[name].clone()
                gate[1::2] = gate[0::2]
                tensors[name] = gate
            elif name.endswith(".expert_map"):
                tensors[name] = torch.arange(tensors[name].numel()) // 2
        save_file(tensors, file, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def described(tmp_path_factory):
    """`{name: (checkpoint dir, vLLM record with "layers")}` for the checkpoints above and the twins."""
    keep = os.environ.get("MOEPRESS_SERVING_WORK")
    root = Path(keep) if keep else tmp_path_factory.mktemp("fused")
    root.mkdir(parents=True, exist_ok=True)
    paths = {f"{s}-{v}": _compress(root, s, v) for s, v in FUSED + OPAQUE}
    twins = root / TWINS
    paths[TWINS] = twins if (twins / "config.json").exists() else _twins(paths["mixtral-ref-mergemoe"], twins)
    records = parity.serve(list(paths.values()), root, "--describe", need_tokens=True)
    return {name: (path, records[str(path)]) for name, path in paths.items()}


@pytest.mark.parametrize("source,variant", FUSED, ids=[f"{s}-{v}" for s, v in FUSED])
def test_remap_and_expert_count_layers_are_vllm_fused_moe_layers(described, source, variant):
    path, record = described[f"{source}-{variant}"]
    config = json.loads((path / "config.json").read_text())
    listed = config["moepress"]["layers"]
    assert listed and record["layers"], record
    for index, served in record["layers"].items():
        layer_cfg = listed.get(index)
        if layer_cfg is None:  # a layer the checkpoint does not list keeps the family's own block
            assert served.startswith("stock:"), (index, served)
            continue
        assert served.startswith(f"fused:{layer_cfg['kind']}:"), (index, served)
        kind, kernel, counts = served.split(":")[1:]
        # vLLM's CPU fused-experts kernel, over the stored experts, routed over the router's rows
        assert kernel.startswith("CPU") and kernel.endswith("Experts"), served
        m = layer_cfg["num_merged"] if kind == "remap" else layer_cfg["num_experts"]
        n = layer_cfg["num_experts"]
        assert counts == f"{m}/{n}", (index, served, layer_cfg)
    if variant == "reap+budget-auto":  # per-layer counts: the layers differ
        assert len({served.split(":")[-1] for served in record["layers"].values()}) > 1, record["layers"]


@pytest.mark.parametrize("source,variant", OPAQUE, ids=[f"{s}-{v}" for s, v in OPAQUE])
def test_other_kinds_keep_the_opaque_op(described, source, variant):
    path, record = described[f"{source}-{variant}"]
    listed = json.loads((path / "config.json").read_text())["moepress"]["layers"]
    assert set(record["layers"]) >= set(listed)
    assert all(record["layers"][index].startswith("opaque:") for index in listed), record["layers"]


def _duplicate_share(model, prompts) -> float:
    """Share of routed tokens (all remapped layers, all prompts) whose top-k names one merged expert
    more than once, in transformers."""
    counts = [0, 0]

    def hook(block):
        def record(_module, _inputs, output):
            merged = block.expert_map[output[2]].sort(dim=-1).values
            counts[0] += int((merged[:, 1:] == merged[:, :-1]).any(dim=-1).sum())
            counts[1] += merged.shape[0]
        return record

    handles = [layer.mlp.router.register_forward_hook(hook(layer.mlp)) for layer in model.model.layers
               if getattr(layer.mlp, "kind", None) == "remap"]
    try:
        with torch.no_grad():
            for prompt in prompts:
                model(torch.tensor([prompt]))
    finally:
        for handle in handles:
            handle.remove()
    return counts[0] / max(counts[1], 1)


@pytest.mark.parametrize("name", [TWINS, "mixtral-ref-mergemoe"])
def test_a_merged_expert_chosen_twice_is_served_exactly(described, name):
    """Every token of the twins (and some of MergeMoE's own output) picks one merged expert in two
    top-k slots; vLLM's fused path gives transformers' greedy tokens and log-probabilities."""
    path, record = described[name]
    assert all(p.startswith("fused:remap:") for p in record["layers"].values()), record["layers"]
    model = moepress.load(path)
    share = _duplicate_share(model, parity.PROMPTS)
    assert share == 1.0 if name == TWINS else share > 0.1, share
    for i, prompt in enumerate(parity.PROMPTS):
        expected = parity._transformers_greedy(model, prompt, use_cache=True)
        assert record["tokens"][i] == expected, f"prompt {i}: vLLM {record['tokens'][i]} vs transformers {expected}"
        reference = parity._logprobs(model, prompt, expected)
        assert max(abs(a - b) for a, b in zip(record["logprobs"][i], reference)) < parity.LOGPROB_ATOL
