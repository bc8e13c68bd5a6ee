"""Expert merging (docs/algorithms.md: mergemoe, hcsmoe, msmoe, zipit,
average): remapped block, ops, methods, export."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

import moepress
from moepress.arch import SUPPORTED as FAMILIES
from moepress.arch import moe_layer_views, set_moe_block
from moepress.testing import tiny_model
from moepress.calib.stats import LayerStatistics
from moepress.methods import LayerContext, available_methods, build_method
from moepress.methods.merging_common import MergingMethod, average_experts, build_remap_block, expert_tensors
from moepress.methods.mergemoe.method import down_projection_equations
from moepress.modeling.moepress_remap import RemappedMoeBlock
from moepress.ops.alignment import match_neurons, neuron_features, permute_expert
from moepress.ops.clustering import centre_grouping, groups_of, hierarchical_grouping
from moepress.ops.least_squares import NormalEquations, RankDeficientWarning, solve_normal_equations
from moepress.ops.merging import frequency_weights

# every registered method that merges experts
MERGERS = tuple(n for n, cls in available_methods().items() if issubclass(cls, MergingMethod))


def _out(block, x):
    y = block(x.unsqueeze(0))
    return (y[0] if isinstance(y, tuple) else y)[0]


def _layer(family, tokens=256, seed=0):
    model = tiny_model(family)
    view = moe_layer_views(model)[0]
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randn(tokens // 2, view.hidden_size, generator=gen) for _ in range(2)]
    return model, view, LayerStatistics(view, batches)


def _make_identical(view, groups):
    """Overwrite every expert of each group with the group's first expert (weights and biases)."""
    with torch.no_grad():
        for members in groups:
            for j in members[1:]:
                view.experts.gate_up_proj[j] = view.experts.gate_up_proj[members[0]]
                view.experts.down_proj[j] = view.experts.down_proj[members[0]]
                if view.gate_bias is not None:
                    view.experts.gate_up_proj_bias[j] = view.experts.gate_up_proj_bias[members[0]]
                    view.experts.down_proj_bias[j] = view.experts.down_proj_bias[members[0]]


# ---------------------------------------------------------------- remapped block (docs/algorithms.md#remapped-block)
@pytest.mark.parametrize("family", FAMILIES)
def test_remap_identity_is_stock_bit_for_bit(family):
    model, view, _ = _layer(family)
    view.experts.config._experts_implementation = "eager"  # the stock reference loop
    block = build_remap_block(view, torch.arange(view.num_experts), expert_tensors(view))
    x = torch.randn(40, view.hidden_size)
    with torch.no_grad():
        assert torch.equal(_out(block, x), _out(view.block, x))
    assert block.layer_config() == {"kind": "remap", "num_merged": view.num_experts,
                                    "num_experts": view.num_experts, "intermediate_size": view.intermediate_size}
    assert block.gate_up_proj.data_ptr() != view.experts.gate_up_proj.data_ptr()  # no aliasing


@pytest.mark.parametrize("family", FAMILIES)
def test_remap_two_identical_experts_on_one(family):
    model, view, _ = _layer(family)
    _make_identical(view, [[1, 5]])
    expert_map = torch.tensor([0, 1, 2, 3, 4, 1, 5, 6])
    keep = [0, 1, 2, 3, 4, 6, 7]
    merged = {k: None if v is None else v[keep] for k, v in expert_tensors(view).items()}
    block = build_remap_block(view, expert_map, merged)
    x = torch.randn(64, view.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(_out(block, x), _out(view.block, x), atol=1e-5, rtol=1e-5)
    routed, active, stored = block.moepress_parameter_counts()
    assert stored == 7 and routed == 7 * active // view.top_k


# ---------------------------------------------------------------- ops (docs/algorithms.md: mergemoe, msmoe)
def test_grouping_extremes_and_weights():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(8, 20, generator=gen)
    freq = torch.tensor([5.0, 1, 9, 3, 0, 7, 2, 4])
    sim = features @ features.T
    assert torch.equal(centre_grouping(freq, sim, 8), torch.arange(8))
    assert torch.equal(centre_grouping(freq, sim, 1), torch.zeros(8, dtype=torch.long))
    assert torch.equal(hierarchical_grouping(features, 8), torch.arange(8))
    assert torch.equal(hierarchical_grouping(features, 1), torch.zeros(8, dtype=torch.long))
    emap = centre_grouping(freq, sim, 3)
    groups = groups_of(emap)
    assert len(groups) == 3 and sorted(sum(groups, [])) == list(range(8))
    assert {2, 5, 0} == {max(g, key=lambda j: freq[j]) for g in groups}  # top-3 frequency are centres
    b = frequency_weights(freq, emap)
    sums = torch.zeros(3, dtype=torch.float64).index_add_(0, emap, b)
    torch.testing.assert_close(sums, torch.ones(3, dtype=torch.float64))  # columns of B sum to 1
    torch.testing.assert_close(b[2], freq[2].double() / freq[emap == emap[2]].double().sum())


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_permutation_alignment_preserves_expert(family):
    _, view, _ = _layer(family)
    t = expert_tensors(view)
    perm = torch.randperm(view.intermediate_size, generator=torch.Generator().manual_seed(3))
    g, u, d, gb, ub = permute_expert(perm, t["gate"][2], t["up"][2], t["down"][2],
                                     None if t["gate_bias"] is None else t["gate_bias"][2],
                                     None if t["up_bias"] is None else t["up_bias"][2])
    x = torch.randn(16, view.hidden_size)
    gate, up = x @ g.T, x @ u.T
    if gb is not None:
        gate, up = gate + gb, up + ub
    y = view.activation(gate, up) @ d.T + (0 if t["down_bias"] is None else t["down_bias"][2])
    torch.testing.assert_close(y, view.expert(2, x), atol=1e-5, rtol=1e-5)
    # matching a permuted copy against the original recovers the permutation
    found = match_neurons(neuron_features(g, u, d), neuron_features(t["gate"][2], t["up"][2], t["down"][2]))
    torch.testing.assert_close(g[found], t["gate"][2])


@pytest.mark.parametrize("tokens", [40, 300])  # fewer than f=64 (row/dual mode) and more (Gram mode)
def test_streamed_least_squares_is_min_norm_lstsq(tokens):
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(tokens, 64, generator=gen, dtype=torch.float64)
    y = torch.randn(tokens, 10, generator=gen, dtype=torch.float64)
    eq = NormalEquations(64, 10)
    for chunk in range(0, tokens, 16):  # batching never changes the result
        eq.add(p[chunk:chunk + 16], y[chunk:chunk + 16])
    assert (eq.rows_p is None) == (tokens >= 64)
    ref = torch.linalg.lstsq(p, y, driver="gelsd").solution.T  # minimum-norm solution
    torch.testing.assert_close(eq.solve(), ref, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(eq.solve("ridge", 1e-3), solve_normal_equations(y.T @ p, p.T @ p, "ridge", 1e-3))


def test_pinv_solution_matches_lstsq_and_ridge_converges():
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(300, 24, generator=gen, dtype=torch.float64)
    y = torch.randn(300, 10, generator=gen, dtype=torch.float64)
    w = solve_normal_equations(y.T @ p, p.T @ p)
    ref = torch.linalg.lstsq(p, y).solution.T
    torch.testing.assert_close(w, ref, atol=1e-9, rtol=1e-9)
    w_ridge = solve_normal_equations(y.T @ p, p.T @ p, solver="ridge", ridge=1e-12)
    torch.testing.assert_close(w_ridge, ref, atol=1e-7, rtol=1e-7)


# ---------------------------------------------------------------- MergeMoE (docs/algorithms.md#mergemoe)
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_mergemoe_down_projection_is_the_least_squares_optimum(family):
    _, view, stats = _layer(family, tokens=512)
    t = expert_tensors(view)
    emap = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    b = frequency_weights(stats["frequency"], emap)
    merged = average_experts(t, emap, b)
    eq = down_projection_equations(view, stats.routed(), [0, 1], b, merged, 0, "all")
    fitted = solve_normal_equations(eq.cross, eq.gram)
    # rebuild P and Y_tgt explicitly on the same tokens
    x = torch.cat(stats.batches).double()
    gate, up = x @ merged["gate"][0].double().T, x @ merged["up"][0].double().T
    if merged["gate_bias"] is not None:
        gate, up = gate + merged["gate_bias"][0], up + merged["up_bias"][0]
    p = view.activation(gate, up)
    y = sum(b[j] * (view.intermediate(j, x.float()).double() @ t["down"][j].double().T) for j in (0, 1))
    torch.testing.assert_close(fitted, torch.linalg.lstsq(p, y).solution.T, atol=1e-6, rtol=1e-5)
    err_fit = (p @ fitted.T - y).norm()
    err_avg = (p @ merged["down"][0].double().T - y).norm()
    assert err_fit <= err_avg + 1e-9


@pytest.mark.parametrize("family", FAMILIES)
def test_mergemoe_with_stacked_identities_is_msmoe_average(family):
    _, view, stats = _layer(family)
    a = build_method("mergemoe", experts=4, down="average", similarity="cosine").compress_layer(
        LayerContext(view, stats, 0, 1))
    emap = a.block.expert_map
    expected = average_experts(expert_tensors(view), emap, frequency_weights(stats["frequency"], emap))
    got = a.block.unpack()
    for k, v in expected.items():
        if v is not None:
            torch.testing.assert_close(got[k], v)
    # and the M-SMoE method on the same map (no alignment, weight similarity) gives the same experts
    b = build_method("msmoe", experts=4, similarity="weight", align=False).compress_layer(
        LayerContext(view, stats, 0, 1))
    assert torch.equal(b.block.expert_map, emap)  # same grouping rule (frequency centres, weight cosine)
    torch.testing.assert_close(b.block.gate_up_proj, a.block.gate_up_proj)
    torch.testing.assert_close(b.block.down_proj, a.block.down_proj)


@pytest.mark.parametrize("method", MERGERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_identical_experts_merge_to_identical_outputs(family, method):
    """All experts identical -> whatever the grouping, every merged expert is that expert
    (docs/algorithms.md: mergemoe, hcsmoe)."""
    _, view, stats = _layer(family, tokens=256)
    x = torch.randn(48, view.hidden_size)
    with torch.no_grad():
        _make_identical(view, [list(range(view.num_experts))])
        ref = _out(view.block, x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RankDeficientWarning)
            result = build_method(method, experts=view.top_k).compress_layer(LayerContext(view, stats, 0, 1))
        assert result.block.num_merged == view.top_k
        assert sorted(sum(result.record["groups"], [])) == list(range(view.num_experts))
        torch.testing.assert_close(_out(result.block, x), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method", MERGERS)
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_keeping_all_experts_is_the_identity(family, method):
    _, view, stats = _layer(family)
    x = torch.randn(48, view.hidden_size)
    result = build_method(method, experts=view.num_experts).compress_layer(LayerContext(view, stats, 0, 1))
    assert torch.equal(result.block.expert_map, torch.arange(view.num_experts))
    with torch.no_grad():
        torch.testing.assert_close(_out(result.block, x), _out(view.block, x), atol=1e-6, rtol=1e-5)


def test_mergemoe_warns_when_rank_deficient():
    _, view, stats = _layer("mixtral", tokens=32)
    with pytest.warns(RankDeficientWarning, match="at least 96 tokens"):
        build_method("mergemoe", experts=4, tokens="all").compress_layer(LayerContext(view, stats, 0, 1))


def test_stock_export_keeps_singletons_exact_and_sets_export():
    _, view, stats = _layer("mixtral")
    method = build_method("mergemoe", experts=8, export="stock")
    assert method.requirements().export == "stock" and build_method("mergemoe", ratio=0.5).requirements().export == "custom"
    block = method.compress_layer(LayerContext(view, stats, 0, 1)).block
    assert type(block) is type(view.block) and block.experts.gate_up_proj.shape[0] == 8
    x = torch.randn(48, view.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(_out(block, x), _out(view.block, x), atol=1e-4, rtol=1e-3)


def test_export_option_speaks_custom_or_stock_and_accepts_exact():
    from moepress.methods import ConfigError

    for given in ("custom", "exact"):  # "exact": the option's first name, kept as an alias
        method = build_method("mergemoe", ratio=0.5, export=given)
        assert method.config.export == method.export == "custom"
    with pytest.raises(ConfigError, match="'custom'.*'stock'"):
        build_method("mergemoe", ratio=0.5, export="approximate")


# ---------------------------------------------------------------- save -> reload
def _ids(seed=1):
    return torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(seed))


ROUND_TRIPS = [(f, "exact") for f in FAMILIES] + [(f, "stock") for f in ("mixtral", "deepseek_v3", "gpt_oss")]


@pytest.mark.parametrize("family,export", ROUND_TRIPS)
def test_mergemoe_save_reload_same_logits(family, export, tokenizer, calib_file, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankDeficientWarning)
        result = moepress.compress(tiny_model(family), "mergemoe", 0.5, calib=calib_file, samples=4, seq_len=24,
                                   tokenizer=tokenizer, export=export)
    out = result.save(tmp_path / "out")
    with torch.no_grad():
        expected = result.model(_ids()).logits
        for reloaded in (transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True),
                         moepress.load(out)):
            torch.testing.assert_close(reloaded.eval()(_ids()).logits, expected, atol=1e-5, rtol=1e-5)
    after = result.record["parameters"]["after"]["routed_experts"]
    assert after * 2 == result.record["parameters"]["before"]["routed_experts"]
