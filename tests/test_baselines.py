"""The papers' missing baselines: MoE-Pruner (ALGORITHMS.md §4.6) and MoE-I² (§4.7)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import moepress
from moepress.arch import SUPPORTED as FAMILIES
from moepress.arch import moe_layer_views, tiny_model
from moepress.calib import LayerStatistics
from moepress.methods import ConfigError, available_methods, build_method
from moepress.ops.moe_pruner import moe_pruner_scores, n_m_mask, unstructured_row_mask


available_methods()  # registers the methods' statistics


def _ids(seed=1):
    return torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(seed))


def _expert_weights(model):
    return {v.layer_index: {p: getattr(v, f"{p}_proj").detach().clone() for p in ("gate", "up", "down")}
            for v in moe_layer_views(model)}


# ---------------------------------------------------------------------------- MoE-Pruner: the formula
def test_moe_pruner_metric_on_a_hand_example():
    weight = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 0.5, 0.0]])
    x = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 1.0]])  # two tokens routed to the expert
    g = torch.tensor([0.5, 2.0])  # their routing weights
    gated_sq = ((x * g[:, None]) ** 2).sum(0)  # [0.25 + 36, 1, 4]
    expected = torch.tensor([[1 * 36.25 ** 0.5, 2 * 1.0, 3 * 2.0], [4 * 36.25 ** 0.5, 0.5 * 1.0, 0.0]])
    torch.testing.assert_close(moe_pruner_scores(weight, gated_sq), expected.double())
    keep = unstructured_row_mask(moe_pruner_scores(weight, gated_sq), 1 / 3)
    assert keep.tolist() == [[True, False, True], [True, True, False]]  # each row drops its lowest


def test_unstructured_sparsity_is_exact_per_row_and_2_4_holds():
    scores = torch.rand(6, 16, generator=torch.Generator().manual_seed(0))
    for sparsity in (0.25, 0.5, 0.75):
        keep = unstructured_row_mask(scores, sparsity)
        assert keep.sum(1).tolist() == [16 - int(16 * sparsity)] * 6
        dropped = scores[~keep].reshape(6, -1)
        assert bool((dropped.max(1).values <= scores.masked_fill(~keep, 2.0).min(1).values).all())
    keep = n_m_mask(scores, 2, 4)
    groups = keep.reshape(6, 4, 4)
    assert bool((groups.sum(-1) == 2).all())
    best2 = torch.topk(scores.reshape(6, 4, 4), 2, dim=-1).indices
    assert bool(torch.gather(groups, -1, best2).all())


def test_layer_statistic_is_router_weighted_and_batch_invariant():
    model = tiny_model("mixtral")
    view = moe_layer_views(model)[0]
    x = torch.randn(30, view.hidden_size, generator=torch.Generator().manual_seed(2))
    whole = LayerStatistics(view, [x])["gated_input_sq"]
    split = LayerStatistics(view, list(x.split(7)))["gated_input_sq"]
    for key in ("input", "intermediate", "tokens"):
        torch.testing.assert_close(whole[key], split[key], rtol=1e-5, atol=1e-9)  # fp32 GEMM shapes differ
    with torch.no_grad():
        r = view.route(x)
        brute = torch.zeros(view.num_experts, view.hidden_size, dtype=torch.float64)
        for t in range(x.shape[0]):
            for s in range(view.top_k):
                brute[int(r.index[t, s])] += (float(r.weights[t, s]) * x[t].double()) ** 2
    torch.testing.assert_close(whole["input"], brute)


# ---------------------------------------------------------------------------- MoE-Pruner: the method
@pytest.mark.parametrize("pattern, ratio", [("unstructured", 0.5), ("unstructured", 0.25), ("2:4", None)])
def test_moe_pruner_zeroes_exactly_the_ratio_per_row(pattern, ratio, tokenizer, calib_file):
    model = tiny_model("qwen3_moe")
    before = _expert_weights(model)
    result = moepress.compress(model, "moe_pruner", ratio, calib=calib_file, samples=4, seq_len=32,
                               tokenizer=tokenizer, pattern=pattern)
    after = _expert_weights(result.model)
    sparsity = 0.5 if ratio is None else ratio
    for layer, weights in after.items():
        for p, w in weights.items():
            zero = w == 0
            assert zero.sum(-1).unique().tolist() == [int(w.shape[-1] * sparsity)]  # every row, every expert
            assert torch.equal(w[~zero], before[layer][p][~zero])  # survivors untouched
            if pattern == "2:4":
                assert bool(((~zero).reshape(*w.shape[:-1], -1, 4).sum(-1) == 2).all())
        record = result.records[layer]
        assert record["achieved_sparsity"] == sparsity
        assert record["routed_nonzero"] == record["routed_parameters"] - record["pruned_weights"]
    counts = result.model.config.num_experts
    assert counts == 8  # architecture unchanged


def test_moe_pruner_ratio_zero_is_identity(tokenizer, calib_file):
    model = tiny_model("mixtral")
    with torch.no_grad():
        before = model(_ids()).logits.clone()
    result = moepress.compress(model, "moe_pruner", 0.0, calib=calib_file, samples=4, seq_len=32, tokenizer=tokenizer)
    with torch.no_grad():
        assert torch.equal(result.model(_ids()).logits, before)
    assert all(r["pruned_weights"] == 0 for r in result.records.values())


def test_moe_pruner_config_errors_are_for_people():
    with pytest.raises(ConfigError, match="2:4 zeroes 0.5"):
        build_method("moe_pruner", ratio=0.3, pattern="2:4")
    with pytest.raises(ConfigError, match="unstructured' or 'N:M'"):
        build_method("moe_pruner", ratio=0.5, pattern="half")
    with pytest.raises(ConfigError, match="not --experts"):
        build_method("moe_pruner", experts=4)
    with pytest.raises(ConfigError, match="needs --ratio"):
        build_method("moe_pruner")


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_pruner_stock_round_trip(family, tokenizer, calib_file, tmp_path):
    result = moepress.compress(tiny_model(family), "moe_pruner", 0.5, calib=calib_file, samples=4, seq_len=32,
                               tokenizer=tokenizer)
    out = result.save(tmp_path / "out")
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        diff = (reloaded(_ids()).logits - result.model(_ids()).logits).abs().max().item()
    assert diff <= 1e-5
    zeros = sum(int((w == 0).sum()) for ws in _expert_weights(reloaded).values() for w in ws.values())
    layers = json.loads((out / "moepress.json").read_text())["layers"]
    assert zeros >= sum(v["pruned_weights"] for v in layers.values()) > 0
    assert all(v["routed_nonzero"] < v["routed_parameters"] for v in layers.values())
