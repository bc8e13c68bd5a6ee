"""Pruning methods x architectures: compress -> save -> plain from_pretrained -> same logits (docs/algorithms.md#frequency)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

import moepress
from moepress.arch import SUPPORTED as FAMILIES
from moepress.arch import moe_layer_views
from moepress.testing import tiny_model
from moepress.calib import LayerStatistics
from moepress.methods import available_methods
from moepress.methods.pruning import PruningMethod
from moepress.ops.saliency import naee_search

# every registered method that prunes whole experts
PRUNERS = tuple(n for n, cls in available_methods().items() if issubclass(cls, PruningMethod))


def _ids(seed=1):
    return torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", PRUNERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_prune_save_reload_stock(family, method, tokenizer, calib_file, tmp_path):
    result = moepress.compress(tiny_model(family), method, 0.5, calib=calib_file, samples=6, seq_len=32,
                               tokenizer=tokenizer)
    out = result.save(tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        diff = (reloaded(_ids()).logits - result.model(_ids()).logits).abs().max().item()
    assert diff <= 1e-5
    record = json.loads((out / "moepress.json").read_text())
    assert record["method"] == method and record["calibration"]["tokens"] == 6 * 32
    layers = record["layers"]
    assert {len(v["kept"]) for v in layers.values()} == {4}
    assert record["parameters"]["after"]["routed_experts"] * 2 == record["parameters"]["before"]["routed_experts"]
    if family.startswith("deepseek"):
        assert "0" not in layers  # dense first layer skipped


@pytest.mark.parametrize("method", PRUNERS)
def test_pruning_nothing_is_identity(method, tokenizer, calib_file):
    model = tiny_model("qwen2_moe")
    with torch.no_grad():
        before = model(_ids()).logits.clone()
    # Keeping every expert (--ratio 0 is refused as "nothing to compress"; --experts N is the same request).
    n = model.config.num_experts
    result = moepress.compress(model, method, experts=n, calib=calib_file, samples=4, seq_len=32, tokenizer=tokenizer)
    with torch.no_grad():
        assert torch.equal(result.model(_ids()).logits, before)


def _make_experts_unreachable(model, dead=(6, 7), scale=2.0):
    """Rows 0..5 = ±3 directions (so the top-2 logits are >= 0), dead rows 0, biases -50: never routed.

    """
    torch.manual_seed(0)
    for view in moe_layer_views(model):
        w = view.router.weight
        with torch.no_grad():
            dirs = torch.randn(3, w.shape[1]) * scale
            w[:6] = torch.cat([dirs, -dirs])
            w[list(dead)] = 0
            for name in view.spec.router_buffers:
                t = getattr(view.router, name)
                t.zero_()
                t[list(dead)] = -50.0


# DeepSeek-V2 never renormalises its routing weights (test below), so pruning changes its outputs.
RENORMALISABLE = [f for f in FAMILIES if f != "deepseek_v2"]


@pytest.mark.parametrize("family", RENORMALISABLE)
def test_pruning_unreached_experts_keeps_outputs(family, tokenizer, calib_file):
    """Exact for routers that renormalise over the selected experts. Routers that weight by the
    softmax over *all* experts (Qwen2/OLMoE without norm_topk_prob, DeepSeek-V2) lose the pruned
    experts' probability mass from the denominator, so their outputs legitimately change: for
    Qwen2/OLMoE we test with norm_topk_prob=True; DeepSeek-V2 has no such option and its exact
    rescaling is tested separately. DeepSeek-V3's group-limited routing groups experts by
    position, so it is tested with one group."""
    renorm = {"norm_topk_prob": True} if family in ("qwen2_moe", "olmoe") else {}
    if family == "deepseek_v3":  # with n_group > 1, pruning re-forms the contiguous expert groups
        renorm = {"n_group": 1, "topk_group": 1}
    model = tiny_model(family, **renorm)
    # small logits for sigmoid routers: saturated scores tie at 1.0 and top-k breaks ties by layout
    _make_experts_unreachable(model, scale=0.05 if family == "deepseek_v3" else 2.0)
    calib = moepress.calib.build_calibration(tokenizer, calib_file, samples=4, seq_len=32)
    with torch.no_grad():
        before = model(calib.input_ids).logits.clone()
    result = moepress.compress(model, "frequency", experts=6, calib=calib_file, samples=4, seq_len=32,
                               tokenizer=tokenizer)
    assert all(r["kept"] == [0, 1, 2, 3, 4, 5] for r in result.records.values())
    assert all(r["scores"][6:] == [0.0, 0.0] for r in result.records.values())
    with torch.no_grad():
        after = result.model(calib.input_ids).logits
    assert (after - before).abs().max().item() <= 1e-5


def _dense_weights(routing, num_experts):
    """`[T, E]` routing weights, zero where an expert is not selected (order of top-k irrelevant)."""
    return torch.zeros(routing.index.shape[0], num_experts).scatter(1, routing.index, routing.weights)


def test_pruning_unreached_experts_rescales_deepseek_v2_routing(tokenizer, calib_file):
    """DeepSeek-V2 (transformers' DeepseekV2TopkRouter, topk_method="greedy") weights a selected
    expert j by `s * p_j`, p = softmax over *all* E experts, never renormalised. Pruning experts
    that are never selected keeps every selection, but removes their mass from the softmax's
    denominator: each kept weight becomes `s * p_j / Σ_{i kept} p_i`. That relation is exact and
    asserted at every MoE layer; the model's outputs then change, and we assert that they do."""
    model = tiny_model("deepseek_v2")
    _make_experts_unreachable(model, scale=0.1)  # small logits: the unselected experts keep real mass
    original = copy.deepcopy(model)
    calib = moepress.calib.build_calibration(tokenizer, calib_file, samples=4, seq_len=32)
    result = moepress.compress(model, "frequency", experts=6, calib=calib_file, samples=4, seq_len=32,
                               tokenizer=tokenizer)
    kept = [0, 1, 2, 3, 4, 5]
    assert all(r["kept"] == kept for r in result.records.values())
    x = torch.randn(64, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for old, new in zip(moe_layer_views(original), moe_layer_views(result.model), strict=True):
            a, b = old.route(x), new.route(x)
            dense_a = _dense_weights(a, 8)
            assert not dense_a[:, 6:].any()  # the pruned experts were never selected
            kept_mass = a.logits.softmax(-1)[:, kept].sum(-1, keepdim=True)
            assert (kept_mass < 0.9).any()  # ... yet hold probability mass the softmax loses
            torch.testing.assert_close(_dense_weights(b, 6), dense_a[:, kept] / kept_mass)
        before = original(calib.input_ids).logits
        after = result.model(calib.input_ids).logits
    assert (after - before).abs().max().item() > 1e-3


def test_reap_matches_brute_force_and_ignores_batching():
    model = tiny_model("mixtral")
    view = moe_layer_views(model)[0]
    x = torch.randn(40, view.hidden_size)
    whole = LayerStatistics(view, [x])["reap"]
    split = LayerStatistics(view, list(x.split(7)))["reap"]
    torch.testing.assert_close(whole, split, rtol=1e-6, atol=1e-9)  # fp32 GEMM shapes differ; sums are fp64
    sums, counts = torch.zeros(view.num_experts, dtype=torch.float64), torch.zeros(view.num_experts)
    with torch.no_grad():
        r = view.route(x)
        for t in range(x.shape[0]):
            for s in range(view.top_k):
                j = int(r.index[t, s])
                sums[j] += float(r.weights[t, s]) * float(view.expert(j, x[t : t + 1]).norm())
                counts[j] += 1
    brute = torch.where(counts > 0, sums / counts.clamp_min(1), 0.0)
    torch.testing.assert_close(whole, brute, rtol=1e-5, atol=1e-7)


def test_naee_drops_a_duplicate_expert_with_no_router_preference(tokenizer, calib_file):
    model = tiny_model("mixtral", num_layers=1)
    view = moe_layer_views(model)[0]
    torch.manual_seed(0)
    with torch.no_grad():  # expert 3 duplicates expert 5; its router row is 0 while the top-2 logits are > 0
        view.experts.gate_up_proj[3] = view.experts.gate_up_proj[5]
        view.experts.down_proj[3] = view.experts.down_proj[5]
        dirs = torch.randn(4, view.hidden_size) * 2
        view.router.weight[[0, 1, 2, 4, 5, 6, 7]] = torch.cat([dirs[:3], -dirs[:3], dirs[3:]])
        view.router.weight[3] = 0
    result = moepress.compress(model, "naee", experts=7, calib=calib_file, samples=4, seq_len=32,
                               tokenizer=tokenizer)
    record = result.records[0]
    assert 3 not in record["kept"] and record["search"] == "exhaustive"
    assert record["loss"] <= 1e-8 and record["subsets_evaluated"] == 8


def test_naee_search_enumerates_and_greedy_is_stated():
    costs = {0: 5.0, 1: 1.0, 2: 3.0, 3: 0.5}
    loss = lambda kept: sum(c for e, c in costs.items() if e not in kept)  # noqa: E731
    assert naee_search(4, 2, loss)[:2] == ([0, 2], "exhaustive")
    assert naee_search(4, 2, loss, max_subsets=1)[:2] == ([0, 2], "greedy")


def test_bad_ratio_and_unknown_option_are_clear_errors(tokenizer, calib_file):
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        moepress.compress(tiny_model("mixtral"), "reap", 1.5, calib=calib_file, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="no option"):
        moepress.compress(tiny_model("mixtral"), "reap", 0.5, bogus=1, calib=calib_file, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="top-k"):
        moepress.compress(tiny_model("mixtral"), "frequency", experts=1, calib=calib_file, samples=2,
                          seq_len=16, tokenizer=tokenizer)


@pytest.mark.parametrize("family", ["mixtral", "phimoe", "deepseek_v3", "gpt_oss"])
def test_offloaded_run_equals_in_memory_run(family, tiny_checkpoint, calib_file, tmp_path):
    """Bounded-memory streaming (layers read from either disk layout) gives the same checkpoint."""
    src = tiny_checkpoint(family)
    kwargs = dict(calib=calib_file, samples=4, seq_len=32)
    in_memory = moepress.compress(src, "reap", 0.5, offload=False, **kwargs)
    streamed = moepress.compress(src, "reap", 0.5, offload=tmp_path / "work", **kwargs)
    assert streamed.record["offload"] and next(streamed.model.model.layers.parameters()).is_meta
    assert streamed.records[max(streamed.records)]["kept"] == in_memory.records[max(in_memory.records)]["kept"]
    out = streamed.save(tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        diff = (reloaded(_ids()).logits - in_memory.model(_ids()).logits).abs().max().item()
    assert diff <= 1e-5
    assert not any((tmp_path / "work").glob("*.safetensors"))  # shards moved into the checkpoint


@pytest.mark.parametrize("method", ["mergemoe", "compressed_experts"])
def test_offloaded_custom_block_export_reloads(method, tiny_checkpoint, calib_file, tmp_path):
    """Custom blocks (auto_map) also stream: layer shards + config.moepress reload to the same logits."""
    src = tiny_checkpoint("qwen2_moe")
    kwargs = dict(calib=calib_file, samples=4, seq_len=32)
    in_memory = moepress.compress(src, method, 0.5, offload=False, **kwargs)
    out = moepress.compress(src, method, 0.5, offload=tmp_path / "work", **kwargs).save(tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["auto_map"]
    with torch.no_grad():
        diff = (moepress.load(out)(_ids()).logits - in_memory.model(_ids()).logits).abs().max().item()
    assert diff <= 1e-5


class _Killed(Exception):
    pass


@pytest.mark.parametrize("method", ["reap", "mergemoe"])
def test_interrupted_offloaded_run_resumes_where_it_stopped(method, tiny_checkpoint, calib_file, tmp_path):
    src = tiny_checkpoint("mixtral")
    kwargs = dict(calib=calib_file, samples=4, seq_len=32, offload=tmp_path / "work")
    reference = moepress.compress(src, method, 0.5, calib=calib_file, samples=4, seq_len=32, offload=False)

    def kill_after_first_layer(done, total, text):
        if done == 1:
            raise _Killed

    with pytest.raises(_Killed):
        moepress.compress(src, method, 0.5, progress=kill_after_first_layer, **kwargs)
    resumed = moepress.compress(src, method, 0.5, **kwargs)
    assert resumed.record["stages"]["calibration"]["resumed_layers"] == 1
    assert resumed.records[0].get("resumed") and not resumed.records[1].get("resumed")
    out = resumed.save(tmp_path / "out")
    with torch.no_grad():
        diff = (moepress.load(out)(_ids()).logits - reference.model(_ids()).logits).abs().max().item()
    assert diff <= 1e-5
    # a different run (another ratio) never reuses these shards
    other = moepress.compress(src, method, 0.25, **kwargs)
    assert other.record["stages"]["calibration"]["resumed_layers"] == 0


def test_a_save_that_dies_before_the_rename_keeps_every_finished_layer(tiny_checkpoint, calib_file, tmp_path,
                                                                        monkeypatch):
    """The work shards stay until the checkpoint is in place (run/store.py, finish): a save killed
    after the layers were written into it resumes from all of them (issue 20)."""
    import moepress.export as export

    src = tiny_checkpoint("mixtral")
    kwargs = dict(calib=calib_file, samples=4, seq_len=32)
    first = moepress.compress(src, "reap", 0.5, out=tmp_path / "out", **kwargs)

    def killed(*args, **kw):
        raise _Killed

    with monkeypatch.context() as patch:
        patch.setattr(export, "write_record", killed)  # after every layer was handed over
        with pytest.raises(_Killed):
            first.save()
    assert not (tmp_path / "out").exists()
    work = tmp_path / ".out.work"
    assert len(list(work.glob("layer-*.safetensors"))) == 2
    del first
    resumed = moepress.compress(src, "reap", 0.5, out=tmp_path / "out", **kwargs)
    assert resumed.record["stages"]["calibration"]["resumed_layers"] == 2
    out = resumed.save()
    assert moepress.load(out) is not None and not work.exists()


@pytest.mark.parametrize("renormalize", [None, True])
def test_reap_scores_carry_no_autograd_graph(renormalize):
    """REAP's sums ran the experts with gradients on, so its scores reached `choose` with
    requires_grad (a UserWarning at `float(score)`): statistics are computed without autograd."""
    import warnings

    from moepress.methods.base import LayerContext, build_method

    model = tiny_model("mixtral")
    view = moe_layer_views(model)[0]
    stats = LayerStatistics(view, [torch.randn(24, view.hidden_size)])
    method = build_method("reap", renormalize=renormalize)
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = method.saliency(LayerContext(view, stats, 0, 1, model))
        assert not scores.requires_grad and scores.grad_fn is None
        assert not stats["reap"].requires_grad
        method.choose(LayerContext(view, stats, 0, 1, model), 4)


@torch.no_grad()
def _direct_subset_loss(view, x, subset):
    """`Σ_x ||MoE(x) − MoE_S(x)||²` by running the restricted routing and the experts (the definition)."""
    full = view.routed_output(x, view.route(x)).double()
    try:
        from moepress.arch import validate_expert_count
        validate_expert_count(view.config, len(subset))
        _, weights, index = view.subset_router(subset)(x)
        experts = torch.as_tensor(subset)[index]
    except ValueError:  # group-limited routing cannot run on this count: the original routing, masked
        routing = view.route(x)
        mask = torch.zeros(view.num_experts, dtype=torch.bool)
        mask[subset] = True
        weights, experts = routing.weights * mask[routing.index], routing.index
    approx = torch.zeros_like(full)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t], experts[t]):
            approx[t] += float(w) * view.expert(int(e), x[t: t + 1])[0].double()
    return float((full - approx).pow(2).sum())


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_subset_loss_from_products_equals_the_direct_sum(family):
    """The expanded square over per-token products (methods/subset_loss.py) is the loss itself, also
    across token chunks and for a count DeepSeek-V3's group routing refuses (the masked proxy)."""
    from moepress.methods import subset_loss

    view = moe_layer_views(tiny_model(family, num_layers=1))[0]
    x = torch.randn(20, view.hidden_size, generator=torch.Generator().manual_seed(0))
    loss = subset_loss.SubsetLoss(view, x, chunk_tokens=7)  # several chunks of a 20-token set
    n = view.num_experts
    for subset in ([*range(n)], [*range(1, n)], [0, 2, 3, 5][: max(view.top_k, n - 3)], [*range(n - 3)]):
        direct = _direct_subset_loss(view, x, subset)
        assert loss.squared_error(subset) == pytest.approx(direct, rel=1e-5, abs=1e-9 * loss.energy), subset
    assert loss.squared_error([*range(n)]) <= 1e-9 * loss.energy
    with torch.no_grad():
        energy = float(view.routed_output(x, view.route(x)).double().pow(2).sum())
    assert loss.energy == pytest.approx(energy, rel=1e-6)
