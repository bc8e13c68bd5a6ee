"""D²-MoE exactness tests (docs/algorithms.md#d2moe) and the delta block over every family."""

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
from moepress.methods import ConfigError, LayerContext, build_method
from moepress.modeling.moepress_delta import DeltaMoeBlock
from moepress.ops.channel_pruning import rounded_channel_count
from moepress.ops.fisher_merge import fisher_merge
from moepress.ops.rank_allocation import MoELayerShape, find_delta_ratio, rank_for_expert_ratio
from moepress.ops.whitened_svd import activation_error, cholesky_whitener, whitened_svd

PROJ = ("gate", "up", "down")



def _ids(seed=1, n=2, length=24):
    return torch.randint(0, 512, (n, length), generator=torch.Generator().manual_seed(seed))


def _tokens(n=160, h=64, seed=0):
    return torch.randn(n, h, generator=torch.Generator().manual_seed(seed))


def _compress_first_layer(model, *, x=None, prepare=True, **options):
    method = build_method("d2moe", **options)
    if prepare:
        method.prepare(model, _ids(n=3, length=16))
    views = moe_layer_views(model)
    x = _tokens() if x is None else x
    stats = LayerStatistics(views[0], [x[: len(x) // 2], x[len(x) // 2:]])
    return views[0], method.compress_layer(LayerContext(views[0], stats, 0, len(views), model)), x


def _block_out(block, x):
    out = block(x.unsqueeze(0))
    return (out[0] if isinstance(out, tuple) else out).reshape(x.shape)


def _expert_weights(block, p, e):
    return block.expert_weight(p, e)


# ---------------------------------------------------------------------------- exactness, every family
@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_without_pruning_reproduces_experts_and_layer(family):
    model = tiny_model(family)
    view, result, x = _compress_first_layer(model, rank=10**6, base_prune=0.0, base="fisher")
    block = result.block
    assert result.record["intermediate_kept"] == view.intermediate_size
    for p in PROJ:
        original = getattr(view, f"{p}_proj")
        for e in range(view.num_experts):
            assert torch.allclose(_expert_weights(block, p, e), original[e], atol=2e-5), (p, e)
    with torch.no_grad():
        ref = view.forward(x)
        small = _block_out(block, x[:3])   # gathered path (few token-expert pairs)
        big = _block_out(block, x)         # expert-loop path
    assert (big - ref).abs().max() < 1e-4
    assert (small - ref[:3]).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "qwen2_moe"])
@pytest.mark.parametrize("share_v", [False, True])
def test_compute_paths_agree(family, share_v, monkeypatch):
    """Token-major (decode), grouped-matmul and per-expert-loop paths give the same output."""
    model = tiny_model(family)
    view, result, x = _compress_first_layer(model, rank=12, base_prune=0.0, base="mean", share_v=share_v, prepare=False)
    block = result.block
    outs = {}
    with torch.no_grad():
        for path in ("gathered", "grouped", "looped"):
            monkeypatch.setattr(block, "_path", lambda index, x, p=path: p)
            outs[path] = _block_out(block, x[:40])
    assert torch.allclose(outs["gathered"], outs["looped"], atol=1e-5)
    assert torch.allclose(outs["grouped"], outs["looped"], atol=1e-5)


def test_rank_zero_is_the_base_alone():
    model = tiny_model("mixtral")
    view, result, x = _compress_first_layer(model, rank=0, base_prune=0.0, base="mean", prepare=False)
    block = result.block
    with torch.no_grad():
        routing = view.route(x)
        h = block.gated_activation(*(x @ block.base_gate_up.T).chunk(2, dim=-1))
        expected = routing.weights.sum(-1, keepdim=True) * (h @ block.base_down.T)
        for rows in (x[:3], x):
            got = _block_out(block, rows)
            assert torch.allclose(got, expected[: len(rows)], atol=1e-5)


def test_identical_experts_give_zero_deltas():
    model = tiny_model("mixtral")
    view = moe_layer_views(model)[0]
    with torch.no_grad():
        view.experts.gate_up_proj.copy_(view.experts.gate_up_proj[:1].expand_as(view.experts.gate_up_proj))
        view.experts.down_proj.copy_(view.experts.down_proj[:1].expand_as(view.experts.down_proj))
    view, result, x = _compress_first_layer(model, rank=2, base_prune=0.0, base="fisher")
    block = result.block
    for p in PROJ:
        base = block.base_down if p == "down" else block.base_gate_up.chunk(2)[PROJ.index(p)]
        for e in range(view.num_experts):
            assert (block.expert_weight(p, e) - base).abs().max() < 1e-6
    with torch.no_grad():
        assert (_block_out(result.block, x) - view.forward(x)).abs().max() < 1e-5


def test_share_v_full_rank_is_exact_and_stores_one_v():
    model = tiny_model("qwen3_moe")
    view, result, x = _compress_first_layer(model, rank=10**6, base_prune=0.0, base="freq", share_v=True, prepare=False)
    assert result.block.gate_up_v.shape[0] == 1 and result.block.down_v.shape[0] == 1
    with torch.no_grad():
        assert (_block_out(result.block, x) - view.forward(x)).abs().max() < 1e-4


# ---------------------------------------------------------------------------- ops
def test_whitened_svd_never_worse_than_plain_svd_in_activation_norm():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(32, 32, generator=g, dtype=torch.float64) * torch.logspace(0, -3, 32, dtype=torch.float64)
    x = torch.randn(500, 32, generator=g, dtype=torch.float64) @ mix.T      # strongly correlated inputs
    gram = x.T @ x
    delta = torch.randn(24, 32, generator=g, dtype=torch.float64)
    whitener = cholesky_whitener(gram)
    for rank in (1, 4, 8, 16):
        uw, vw = whitened_svd(delta, whitener, rank)
        up, vp = whitened_svd(delta, None, rank)
        white = activation_error(delta, uw @ vw, gram)
        plain = activation_error(delta, up @ vp, gram)
        assert white <= plain * (1 + 1e-9), rank
        assert torch.isclose(white, ((delta - uw @ vw) @ x.T).square().sum(), rtol=1e-8)
    assert activation_error(delta, *[torch.zeros_like(delta)], gram) > white  # the truncation did something
    u, v = whitened_svd(delta, whitener, 32)                                    # S⁻¹ by solve is right
    assert torch.allclose(u @ v, delta, atol=1e-9)


def test_cholesky_whitener_handles_rank_deficient_gram():
    x = torch.randn(3, 10, dtype=torch.float64)       # 3 tokens, 10 dims: Gram of rank 3
    s = cholesky_whitener(x.T @ x)
    assert torch.allclose(s, torch.tril(s)) and torch.isfinite(s).all()
    assert torch.linalg.eigvalsh(s @ s.T).min() >= 1e-5 * (1 - 1e-6)


def test_fisher_merge_uniform_is_mean_and_one_hot_picks_expert():
    w = torch.randn(5, 6, 7, dtype=torch.float64)
    assert torch.allclose(fisher_merge(w, torch.ones_like(w), torch.ones(5)), w.mean(0))
    one_hot = torch.zeros_like(w)
    one_hot[3] = 1.0
    assert torch.allclose(fisher_merge(w, one_hot, torch.ones(5)), w[3])
    assert torch.allclose(fisher_merge(w, torch.rand_like(w) + 0.1, torch.tensor([0.0, 0, 2, 0, 0])), w[2])
    # element-wise: each element follows its own Fisher weights
    fisher = torch.zeros_like(w)
    fisher[1, 0, 0] = fisher[4, 1:, :] = fisher[4, 0, 1:] = 1.0
    merged = fisher_merge(w, fisher, torch.ones(5))
    assert merged[0, 0] == w[1, 0, 0] and torch.equal(merged[1:], w[4, 1:])


TABLE_12 = {  # paper Table 12 (Mixtral-8x7B): target whole-model ratio -> delta_ratio (%) per pp_ratio
    0.1: {0.2: 68.05, 0.4: 47.34, 0.6: 26.62, 0.7: 16.26, 0.8: 5.93},
    0.6: {0.2: 74.30, 0.4: 53.58, 0.6: 32.86, 0.7: 22.54, 0.8: 12.18},
}


def test_table12_delta_ratios_for_mixtral_8x7b():
    config = transformers.MixtralConfig()  # the defaults are Mixtral-8x7B's shapes
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    total = parameter_counts(model)["total"]
    h, i, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    assert total == 2 * config.vocab_size * h + h + n * (2 * (h * h + h * h // 4) + h * 8 + 2 * h + 8 * 3 * h * i)
    layers = [MoELayerShape(8, h, i)] * n
    for pp, row in TABLE_12.items():
        for target, expected in row.items():
            assert round(100 * find_delta_ratio(target, pp, total, layers), 2) == expected, (pp, target)


def test_rank_for_expert_ratio_is_the_largest_within_budget():
    shape = MoELayerShape(8, 64, 96)
    for ratio in (0.2, 0.4, 0.6):
        r = rank_for_expert_ratio(ratio, shape, stored_channels=90)
        stored = lambda k: 3 * 64 * 90 + 8 * 3 * k * (64 + 90)  # noqa: E731
        assert stored(r) <= (1 - ratio) * shape.routed_parameters < stored(r + 1)
    with pytest.raises(ValueError, match="largest ratio"):
        rank_for_expert_ratio(0.95, shape, stored_channels=96)


def test_channel_rounding_to_multiples_of_64():
    assert rounded_channel_count(14336, 0.05) == (704, 64)
    assert rounded_channel_count(256, 0.3) == (64, 64)
    assert rounded_channel_count(96, 0.05) == (8, 8)    # too narrow for 64: nearest multiple of 8
    assert rounded_channel_count(90, 0.05) == (4, 1)    # not a multiple of 8: exact count
    assert rounded_channel_count(256, 0.05) == (16, 8)  # less than one 64 requested: a multiple of 8
    assert rounded_channel_count(256, 0.01) == (3, 1)   # rounds to no multiple: exact count


# ---------------------------------------------------------------------------- method behaviour
def _relative_output_error(view, block, x):
    with torch.no_grad():
        ref = view.forward(x)
        return ((_block_out(block, x) - ref).norm() / ref.norm()).item()


def test_ratio_sets_stored_parameters_and_pruning_is_recorded():
    model = tiny_model("mixtral")
    view, result, x = _compress_first_layer(model, ratio=0.4, base_prune=0.2, base="mean", prepare=False)
    rec = result.record
    assert rec["static_pruned"] == 8 and rec["dynamic_pruned"] == 11 and rec["channel_multiple"] == 8  # 19 = round(0.2 * 96)
    assert result.block.intermediate == view.intermediate_size - 8
    # Stored routed parameters, counted by hand: the statically pruned base (gate, up, down: 3 x H x kept)
    # + for each of 8 experts and 3 projections a rank-r pair U, V of r x (H + kept).
    h, kept, rank = view.hidden_size, rec["intermediate_kept"], rec["ranks"]["gate"]
    before = 8 * 3 * h * view.intermediate_size
    stored_at = lambda r: 3 * h * kept + 8 * 3 * r * (h + kept)  # noqa: E731
    assert kept == 88 and rec["ranks"] == {"gate": rank, "up": rank, "down": rank}
    assert rec["routed_parameters_before"] == before
    assert rec["routed_parameters_after"] == stored_at(rank)
    assert stored_at(rank) <= (1 - 0.4) * before < stored_at(rank + 1)  # the largest rank within the budget
    assert rec["achieved_ratio"] == pytest.approx(1 - stored_at(rank) / before)
    stored, active, experts = result.block.moepress_parameter_counts()
    assert stored == rec["routed_parameters_after"] and experts == 8 and active < stored
    # Same pruning, more delta rank -> closer to the original layer; the base alone is worst.
    errors = {"ratio 0.4": _relative_output_error(view, result.block, x)}
    for name, options in (("ratio 0.2", {"ratio": 0.2}), ("base alone", {"rank": 0})):
        other_view, other, _ = _compress_first_layer(tiny_model("mixtral"), base_prune=0.2, base="mean",
                                                     prepare=False, **options)
        errors[name] = _relative_output_error(other_view, other.block, x)
    assert errors["ratio 0.2"] < errors["ratio 0.4"] < errors["base alone"], errors


def test_batch_scope_pruning_removes_the_lowest_scoring_channels_of_the_batch():
    """The paper's per-batch form (dynamic_scope="batch"): one channel set for the whole batch."""
    model = tiny_model("mixtral")
    view, result, x = _compress_first_layer(model, rank=8, base_prune=0.2, static_share=0.0, base="mean",
                                            prepare=False, dynamic_scope="batch")
    block = result.block
    assert block.dynamic_channels == 19 and block.intermediate == view.intermediate_size  # round(0.2 * 96)
    assert block.layer_config()["dynamic_scope"] == "batch"
    seen = {}
    original_mask = block._dynamic_mask

    def spy(aggregated):
        seen["aggregated"] = aggregated.clone()
        return original_mask(aggregated)

    block._dynamic_mask = spy
    with torch.no_grad():
        pruned = _block_out(block, x)
        score = block.base_down.norm(dim=0) * seen["aggregated"].norm(dim=0)
        dropped = torch.argsort(score)[:19]
        # the same as removing those channels from the base and every expert's down delta
        block.dynamic_channels = 0
        full = _block_out(block, x)
        block.base_down[:, dropped] = 0
        block.down_v[:, :, dropped] = 0
        removed = _block_out(block, x)
    assert not torch.allclose(pruned, full)
    assert torch.allclose(pruned, removed, atol=1e-5)


@pytest.mark.parametrize("tokens", [3, 40], ids=["decode-path", "prefill-path"])
def test_token_scope_pruning_is_per_token_and_batch_invariant(tokens):
    """The default (dynamic_scope="token"): each token drops its own lowest-scoring channels, so its
    output is the same alone and inside any batch (both compute paths), and differs from no pruning."""
    model = tiny_model("mixtral")
    _, result, x = _compress_first_layer(model, rank=8, base_prune=0.2, static_share=0.0, base="mean", prepare=False)
    block = result.block
    assert block.dynamic_scope == "token" and block.dynamic_channels == 19
    x = x[:tokens]
    with torch.no_grad():
        batched = _block_out(block, x)
        alone = torch.cat([_block_out(block, x[t:t + 1]) for t in range(tokens)])
        torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
        # token 0 alone, with its own 19 lowest channels removed from base and deltas by hand
        seen = {}
        original_mask = block._dynamic_mask
        block._dynamic_mask = lambda aggregated: seen.setdefault("a", aggregated.clone()) is not None and original_mask(aggregated)
        _block_out(block, x[:1])
        del block._dynamic_mask
        dropped = torch.argsort(block.base_down.norm(dim=0) * seen["a"][0].abs())[:19]
        block.dynamic_channels = 0
        full = _block_out(block, x[:1])
        block.base_down[:, dropped] = 0
        block.down_v[:, :, dropped] = 0
        removed = _block_out(block, x[:1])
    assert not torch.allclose(alone[:1], full)
    torch.testing.assert_close(alone[:1], removed, atol=1e-5, rtol=1e-5)


def test_whole_model_mode_uses_the_papers_delta_ratio():
    model = tiny_model("mixtral")
    view, result, x = _compress_first_layer(model, ratio=0.3, ratio_mode="whole_model", base_prune=0.1,
                                            base="mean", prepare=False)
    shapes = [MoELayerShape(8, 64, 96)] * 2
    expected = find_delta_ratio(0.3, 0.1, parameter_counts(model)["total"], shapes)
    assert result.record["delta_ratio"] == expected
    assert result.record["ranks"]["gate"] == int(64 * 96 * expected / (64 + 96))


def test_config_errors_are_for_people():
    with pytest.raises(ConfigError, match="fisher, mean, freq"):
        build_method("d2moe", ratio=0.4, base="median")
    with pytest.raises(ConfigError, match="--ratio"):
        build_method("d2moe")
    with pytest.raises(ConfigError, match="largest ratio"):
        _compress_first_layer(tiny_model("mixtral"), ratio=0.95, base_prune=0.0, base="mean", prepare=False)
    with pytest.raises(ConfigError, match="prepare"):
        _compress_first_layer(tiny_model("mixtral"), ratio=0.4, prepare=False)


# ---------------------------------------------------------------------------- export round trip
@pytest.mark.parametrize("family", FAMILIES)
def test_save_reload_same_logits(family, tokenizer, calib_file, tmp_path):
    result = moepress.compress(tiny_model(family), "d2moe", 0.4, calib=calib_file, samples=4, seq_len=32,
                               tokenizer=tokenizer, base_prune=0.1)
    out = result.save(tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" in config and {v["kind"] for v in config["moepress"]["layers"].values()} == {"delta"}
    ids = _ids()
    with torch.no_grad():
        expected = result.model(ids).logits
        via_moepress = moepress.load(out)(ids).logits
        via_remote_code = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()(ids).logits
    assert (via_moepress - expected).abs().max() <= 1e-5
    assert (via_remote_code - expected).abs().max() <= 1e-5
    layers = json.loads((out / "moepress.json").read_text())["layers"]
    assert all(0.4 <= v["achieved_ratio"] < 0.6 for v in layers.values())
