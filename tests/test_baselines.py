"""The papers' missing baselines: MoE-Pruner and MoE-I² (docs/algorithms.md: moe_pruner, moe_i2)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import moepress
from moepress.arch import SUPPORTED as FAMILIES
from moepress.arch import moe_layer_views, parameter_counts
from moepress.testing import tiny_model
from moepress.calib import LayerStatistics
from moepress.methods import ConfigError, LayerContext, available_methods, build_method
from moepress.ops.expert_allocation import allocate_pruned_experts, uniform_pruned_experts
from moepress.ops.low_rank import layer_rank_budget, low_rank_parameters, proportional_ranks
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


def test_moe_pruner_zero_sparsity_mask_keeps_everything_and_ratio_zero_is_refused():
    """Sparsity 0 keeps every weight (the identity at the formula level); the API refuses ratio 0
    because it would compress nothing (issue 12), with a message that says so."""
    from moepress.ops.moe_pruner import unstructured_row_mask

    scores = torch.rand(6, 10, generator=torch.Generator().manual_seed(0))
    assert bool(unstructured_row_mask(scores, 0.0).all())
    assert int(unstructured_row_mask(scores, 0.5).sum()) == 30
    with pytest.raises(ConfigError, match="nothing to compress"):
        build_method("moe_pruner", ratio=0.0)


def test_moe_pruner_config_errors_are_for_people():
    with pytest.raises(ConfigError, match="2:4 zeroes 0.5"):
        build_method("moe_pruner", ratio=0.3, pattern="2:4")
    with pytest.raises(ConfigError, match="unstructured' or 'N:M'"):
        build_method("moe_pruner", ratio=0.5, pattern="half")
    with pytest.raises(ConfigError, match="not --experts"):
        build_method("moe_pruner", experts=4)
    with pytest.raises(ConfigError, match="needs --ratio"):
        build_method("moe_pruner")


def test_moe_pruner_pattern_survives_the_cli_option_parser():
    from moepress.cli.app import parse_opts

    options = parse_opts(["pattern=2:4"], None)  # YAML 1.1 reads 2:4 as the base-60 number 124
    assert build_method("moe_pruner", **options).config.pattern == "2:4"


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


def test_moe_pruner_record_and_eval_count_the_stored_nonzeros(tokenizer, calib_file, tmp_path):
    """Dense tensors with zeros: moepress.json's `parameters.after_nonzero` and `evaluate`'s
    `params/*_nonzero` give the non-zeros, equal to a count over the saved weights; a dense
    method's record and a dense model's report have none."""
    model = tiny_model("qwen3_moe")
    result = moepress.compress(model, "moe_pruner", 0.5, calib=calib_file, samples=4, seq_len=32, tokenizer=tokenizer)
    out = result.save(tmp_path / "out")
    params = json.loads((out / "moepress.json").read_text())["parameters"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    nonzero = sum(int(torch.count_nonzero(w)) for ws in _expert_weights(reloaded).values() for w in ws.values())
    routed = params["after"]["routed_experts"]
    assert params["after"]["routed_experts"] == params["before"]["routed_experts"]  # dense: unchanged
    assert params["after_nonzero"]["routed_experts"] == nonzero
    assert params["after_nonzero"]["total"] == params["after"]["total"] - routed + nonzero
    assert abs(params["after_nonzero"]["routed_sparsity"] - 0.5) < 0.01
    metrics = moepress.evaluate(reloaded, tokenizer=tokenizer).metrics
    assert metrics["params/routed_experts_nonzero"] == nonzero
    assert metrics["params/total_nonzero"] == params["after_nonzero"]["total"]
    assert "params/total_nonzero" not in moepress.evaluate(tiny_model("qwen3_moe"), tokenizer=tokenizer).metrics
    dense = moepress.compress(tiny_model("qwen3_moe"), "frequency", 0.5, calib=calib_file, samples=4, seq_len=32,
                              tokenizer=tokenizer)
    assert "after_nonzero" not in dense.record["parameters"]


# ---------------------------------------------------------------------------- MoE-I²: budgets and allocation
def test_pruned_expert_allocation_spends_the_budget_where_experts_matter_least():
    costs = [torch.tensor([5.0, 0.1, 4.0, 0.2]), torch.tensor([3.0, 3.0, 3.0, 0.3]), torch.tensor([9.0, 8.0, 7.0, 6.0])]
    allowed = [[0, 1, 2], [0, 1, 2], [0, 1, 2]]
    assert allocate_pruned_experts(costs, allowed, 3) == [2, 1, 0]  # costs 0.1 + 0.2 + 0.3
    assert allocate_pruned_experts(costs, allowed, 4) == [2, 2, 0]  # next cheapest: 3.0 (layer 1) < 4.0 < 6.0
    assert allocate_pruned_experts(costs, [[0, 2], [0, 2], [0]], 3) == [2, 0, 0]  # 3 unreachable: closest, smaller
    assert uniform_pruned_experts([8, 8], [[0, 2, 4], [0, 1, 2, 3]], 0.25) == [2, 2]


def test_proportional_ranks_sum_to_the_budget_and_respect_the_cap():
    assert proportional_ranks([1.0, 1.0, 2.0], 12, cap=10) == [3, 3, 6]
    assert proportional_ranks([100.0, 1.0, 1.0], 18, cap=10) == [10, 4, 4]  # surplus of the capped one shared
    assert sum(proportional_ranks([0.3, 0.0, 5.0, 1.0], 17, cap=9)) == 17
    assert proportional_ranks([1.0, 2.0], 100, cap=8) == [8, 8]
    assert proportional_ranks([0.0, 0.0], 5, cap=8) == [3, 2]
    assert layer_rank_budget(per_expert=3 * 64 * 48, rank_cost=low_rank_parameters(64, 48, 1), experts=4,
                             keep_fraction=0.5) == 4 * 64 * 48 // (2 * 112)
    # what stays dense (biases) is paid first: 4 experts x 100 dense parameters leave 400 fewer to spend
    assert layer_rank_budget(3 * 64 * 48 + 100, 3 * 112, 4, 0.5, dense_per_expert=100) == (
        (4 * (3 * 64 * 48 + 100) // 2 - 400) // (3 * 112))


def _first_layer(model, *, x=None, **options):
    method = build_method("moe_i2", layer_allocation="uniform", **options)
    views = moe_layer_views(model)
    x = torch.randn(160, views[0].hidden_size, generator=torch.Generator().manual_seed(0)) if x is None else x
    stats = LayerStatistics(views[0], [x[:80], x[80:]])
    return views[0], method.compress_layer(LayerContext(views[0], stats, 0, len(views), model)), x


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_i2_full_rank_without_pruning_reproduces_the_layer(family):
    # Nothing pruned (expert_share 0: stage 1 takes no share) and a fixed rank above full rank, which
    # overrides the ratio's stage-2 budget (ratio 0 itself is refused as a no-op).
    view, result, x = _first_layer(tiny_model(family), ratio=0.2, expert_share=0.0, rank=10**6)
    block = result.block
    assert result.record["kept"] == list(range(view.num_experts))
    for p in ("gate", "up", "down"):
        original = getattr(view, f"{p}_proj").detach()
        for e in range(view.num_experts):
            torch.testing.assert_close(block.expert_weight(p, e), original[e], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        out = block(x.unsqueeze(0))
        out = (out[0] if isinstance(out, tuple) else out).reshape(x.shape)
        assert (out - view.forward(x)).abs().max() <= 1e-4


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_moe_i2_parameter_counts_match_the_formula(family):
    view, result, _ = _first_layer(tiny_model(family), ratio=0.5)
    h, i, record = view.hidden_size, view.intermediate_size, result.record
    m, ranks = record["experts"], record["ranks"]
    assert m == 6 and len(ranks) == m and min(ranks) >= 1  # uniform: 0.5 x 0.5 of 8 experts pruned
    bias = 0 if view.gate_bias is None else 2 * i + h
    stored = sum(low_rank_parameters(h, i, r) for r in ranks) + m * bias
    assert record["routed_parameters_after"] == stored == result.block.moepress_parameter_counts()[0]
    dense = view.num_experts * (3 * h * i + bias)
    assert record["routed_parameters_before"] == dense
    assert stored <= 0.5 * dense and record["achieved_ratio"] == 1 - stored / dense >= 0.5
    assert dense * 0.5 - stored < 3 * (h + i)  # the budget is spent up to one rank


def test_moe_i2_importance_pass_sets_non_uniform_counts_within_the_budget(tokenizer, calib_file):
    model = tiny_model("olmoe", num_layers=3)
    result = moepress.compress(model, "moe_i2", 0.5, calib=calib_file, samples=4, seq_len=32, tokenizer=tokenizer)
    records = result.records.values()
    assert sum(8 - r["experts"] for r in records) == round(0.25 * 24)
    assert all(r["removal_importance"] is not None and len(r["removal_importance"]) == 8 for r in records)
    before = sum(r["routed_parameters_before"] for r in records)
    after = sum(r["routed_parameters_after"] for r in records)
    assert 0.5 <= 1 - after / before < 0.55
    assert parameter_counts(result.model)["routed_experts"] == after


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_i2_save_reload_same_logits(family, tokenizer, calib_file, tmp_path):
    result = moepress.compress(tiny_model(family), "moe_i2", 0.5, calib=calib_file, samples=4, seq_len=32,
                               tokenizer=tokenizer)
    out = result.save(tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" in config and {v["kind"] for v in config["moepress"]["layers"].values()} == {"lowrank"}
    with torch.no_grad():
        expected = result.model(_ids()).logits
        via_moepress = moepress.load(out)(_ids()).logits
        via_remote_code = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()(_ids()).logits
    assert (via_moepress - expected).abs().max() <= 1e-5
    assert (via_remote_code - expected).abs().max() <= 1e-5
    layers = json.loads((out / "moepress.json").read_text())["layers"]
    assert {v["experts"] for v in layers.values()} <= set(range(2, 9))


def test_moe_i2_config_errors_are_for_people():
    with pytest.raises(ConfigError, match="not --experts"):
        build_method("moe_i2", experts=4)
    with pytest.raises(ConfigError, match="expert_share"):
        build_method("moe_i2", ratio=0.5, expert_share=1.5)
    with pytest.raises(ConfigError, match="layer_allocation must be one of"):
        build_method("moe_i2", ratio=0.5, layer_allocation="genetic")


def test_moe_i2_streams_with_uniform_allocation_and_refuses_offload_for_importance(tiny_checkpoint, calib_file,
                                                                                     tmp_path):
    src = tiny_checkpoint("deepseek_v3")
    kwargs = dict(calib=calib_file, samples=4, seq_len=32, layer_allocation="uniform")
    in_memory = moepress.compress(src, "moe_i2", 0.5, offload=False, **kwargs)
    out = moepress.compress(src, "moe_i2", 0.5, offload=tmp_path / "work", **kwargs).save(tmp_path / "out")
    with torch.no_grad():
        diff = (moepress.load(out)(_ids()).logits - in_memory.model(_ids()).logits).abs().max().item()
    assert diff <= 1e-5
    with pytest.raises(ValueError, match="needs the whole model in memory"):
        moepress.compress(src, "moe_i2", 0.5, calib=calib_file, samples=4, seq_len=32, offload=tmp_path / "work2")
