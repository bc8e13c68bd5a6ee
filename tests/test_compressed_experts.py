"""Compressed Experts (docs/algorithms.md#compressed_experts, exactness tests there): block, method, accounting, finetune."""

from __future__ import annotations

import pytest
import torch
import transformers

from moepress.arch import moe_layer_views, parameter_counts, set_moe_block
from moepress.testing import tiny_model
from moepress.arch import SUPPORTED as FAMILIES
from moepress.calib.stats import LayerStatistics
from moepress.methods.compressed_experts.finetune import (
    FinetuneConfig, FinetuneError, batch_rows, finetune, lr_factor, make_teacher, plot_losses,
)
from moepress.methods import ConfigError, LayerContext, build_method
from moepress.modeling.moepress_compressed import CompressedExpertsBlock, aggregate_compressed
from moepress.ops.accounting import (
    compressed_experts_parameter_counts,
    compressed_vector_parameters,
    expert_parameters,
)

# (family, top-k): all tiny configs are top-2; two top-4 variants exercise several auxiliary experts.
CASES = [(f, 2) for f in FAMILIES] + [("olmoe", 4), ("gpt_oss", 4)]


def _model(family: str, top_k: int, seed: int = 0):
    extra = {} if top_k == 2 else {"num_experts_per_tok": top_k}
    return tiny_model(family, seed=seed, **extra)


def _run(block, x):
    out = block(x.unsqueeze(0))
    return (out[0] if isinstance(out, tuple) else out).reshape(x.shape)


def _randomise_vectors(block, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        block.ce_input.copy_(1 + 0.5 * torch.randn(block.ce_input.shape, generator=g))
        block.ce_intermediate.copy_(1 + 0.5 * torch.randn(block.ce_intermediate.shape, generator=g))


def _top_main_reference(view, x, k_main):
    """Stock experts on the `k_main` highest-weighted experts of each token, original weights."""
    r = view.route(x)
    order = r.weights.argsort(dim=-1, descending=True)
    w, i = r.weights.gather(-1, order)[:, :k_main], r.index.gather(-1, order)[:, :k_main]
    out = view.experts(x, i, w)
    shared = view.shared_output(x)
    return out if shared is None else out + shared


# ------------------------------------------------------------------------------------ block
@pytest.mark.parametrize("family,top_k", CASES)
def test_no_replacement_equals_stock_block(family, top_k):
    model = _model(family, top_k)
    view = moe_layer_views(model)[0]
    x = torch.randn(24, model.config.hidden_size)
    block = CompressedExpertsBlock(view.block, model.config, k_main=top_k)
    _randomise_vectors(block)  # unused when nothing is replaced
    torch.testing.assert_close(_run(block, x), view.forward(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family,top_k", CASES)
def test_initial_vectors_equal_top_k_main_routing(family, top_k):
    model = _model(family, top_k)
    view = moe_layer_views(model)[0]
    x = torch.randn(24, model.config.hidden_size)
    k_main = top_k // 2
    block = CompressedExpertsBlock(view.block, model.config, k_main=k_main)
    expected = _top_main_reference(view, x, k_main)
    torch.testing.assert_close(_run(block, x), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, view.forward(x), atol=1e-4)  # the test can tell top-k_main from top-k


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])
def test_vectors_scale_gate_input_up_input_and_intermediate(family):
    """One token by hand: E_i(x) = W_D((g(W_G(x*t1), W_U(x*t3))) * t2), t = renormalised aux mix."""
    model = _model(family, 4)
    view = moe_layer_views(model)[0]
    block = CompressedExpertsBlock(view.block, model.config, k_main=2)
    _randomise_vectors(block)
    x = torch.randn(1, model.config.hidden_size)
    r = view.route(x)
    order = r.weights[0].argsort(descending=True)
    w, idx = r.weights[0][order], r.index[0][order]
    aux = w[2:] / w[2:].sum()
    t_in = sum(a * block.ce_input[j] for a, j in zip(aux, idx[2:]))
    t_mid = sum(a * block.ce_intermediate[j] for a, j in zip(aux, idx[2:]))
    expected = torch.zeros_like(x)
    for a, j in zip(w[:2], idx[:2]):
        gate, up = (x * t_in[0]) @ view.gate_proj[j].T, (x * t_in[1]) @ view.up_proj[j].T
        if view.gate_bias is not None:
            gate, up = gate + view.gate_bias[j], up + view.up_bias[j]
        y = (view.activation(gate, up) * t_mid) @ view.down_proj[j].T
        expected += a * (y if view.down_bias is None else y + view.down_bias[j])
    torch.testing.assert_close(block.routed(x, r.weights, r.index), expected, atol=1e-5, rtol=1e-5)


def test_auxiliary_order_does_not_matter():
    model = _model("olmoe", 4)
    view = moe_layer_views(model)[0]
    block = CompressedExpertsBlock(view.block, model.config, k_main=1)
    _randomise_vectors(block)
    x = torch.randn(16, model.config.hidden_size)
    r = view.route(x)
    out = block.routed(x, r.weights, r.index)
    perm = torch.tensor([0, 3, 1, 2])  # keep the main expert first, shuffle the three auxiliary ones
    torch.testing.assert_close(block.routed(x, r.weights[:, perm], r.index[:, perm]), out)
    aux_w, aux_i = torch.rand(5, 3), torch.randint(0, 8, (5, 3))
    p = torch.tensor([2, 0, 1])
    torch.testing.assert_close(aggregate_compressed(block.ce_input, aux_w, aux_i),
                               aggregate_compressed(block.ce_input, aux_w[:, p], aux_i[:, p]))
    assert not torch.allclose(out, _top_main_reference(view, x, 1), atol=1e-4)  # vectors do act


def test_gradients_reach_only_auxiliary_vectors():
    model = _model("olmoe", 4)
    view = moe_layer_views(model)[0]
    block = CompressedExpertsBlock(view.block, model.config, k_main=2)
    _randomise_vectors(block)
    x = torch.randn(1, model.config.hidden_size)
    r = view.route(x)
    order = r.weights[0].argsort(descending=True)
    aux = set(r.index[0][order][2:].tolist())
    block.routed(x, r.weights, r.index).pow(2).sum().backward()
    for grad in (block.ce_input.grad, block.ce_intermediate.grad):
        touched = {j for j in range(grad.shape[0]) if grad[j].abs().sum() > 0}
        assert touched == aux  # not the main experts' vectors, not unselected experts'


def test_block_rejects_impossible_k_main():
    model = _model("mixtral", 2)
    view = moe_layer_views(model)[0]
    with pytest.raises(ValueError, match="k_main must be between 1 and top-k=2"):
        CompressedExpertsBlock(view.block, model.config, k_main=3)


# ------------------------------------------------------------------------------------ method
@pytest.mark.parametrize("options,top_k,k_main", [
    ({"ratio": 0.5}, 4, 2), ({"ratio": 0.25}, 4, 3), ({}, 8, 4), ({"n_ce": 1}, 4, 3), ({"k_main": 1}, 2, 1),
])
def test_config_resolves_main_experts(options, top_k, k_main):
    assert build_method("compressed_experts", **options).config.resolve_k_main(top_k) == k_main


@pytest.mark.parametrize("options,message", [
    ({"ratio": 0.5, "n_ce": 1}, "only one of"),
    ({"experts": 4}, "--experts does not apply"),
])
def test_config_errors_are_clear(options, message):
    with pytest.raises(ConfigError, match=message):
        build_method("compressed_experts", **options)


def test_config_error_when_nothing_would_remain():
    with pytest.raises(ConfigError, match="between 0 and 1 of them"):
        build_method("compressed_experts", n_ce=2).config.resolve_k_main(2)


def test_compress_layer_wraps_block_and_records_accounting():
    model = _model("qwen3_moe", 4)
    method = build_method("compressed_experts", ratio=0.5, aux_width=None)  # the paper's block
    views = moe_layer_views(model)
    x = torch.randn(8, model.config.hidden_size)
    before = parameter_counts(model)
    for pos, view in enumerate(views):
        ctx = LayerContext(view, LayerStatistics(view, [x]), pos, len(views), model)
        result = method.compress_layer(ctx)
        assert result.record["k_main"] == 2 and result.record["n_ce"] == 2
        set_moe_block(model, view.layer_index, result.block)
    after = parameter_counts(model)
    e, h, i = 8, model.config.hidden_size, model.config.moe_intermediate_size
    per_expert, vectors = expert_parameters(h, i), compressed_vector_parameters(h, i)
    assert after["total"] == before["total"] + len(views) * e * vectors
    assert after["active_per_token"] == before["active_per_token"] - len(views) * (2 * per_expert - 2 * vectors)


# -------------------------------------------------------------------------------- accounting
def _phi35_counts(num_key_value_heads: int):
    config = transformers.PhimoeConfig(
        vocab_size=32064, hidden_size=4096, intermediate_size=6400, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=num_key_value_heads, num_local_experts=16,
        num_experts_per_tok=2, tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    stock = parameter_counts(model)
    for view in moe_layer_views(model):
        set_moe_block(model, view.layer_index, CompressedExpertsBlock(view.block, config, k_main=1))
    return stock, parameter_counts(model)


def test_accounting_reproduces_phi35_moe():
    """Published Phi-3.5-MoE (8 KV heads): 41.9B total, 6.6B active. The paper's 7.45B -> 4.93B
    (§2.4) is reproduced only when K/V projections are counted at full H x H (32 KV heads):
    0.81B of the 7.45B is that convention, the 2.52B saved (one expert per layer) is the same."""
    stock, ce = _phi35_counts(8)
    assert round(stock["total"] / 1e9, 1) == 41.9 and round(stock["active_per_token"] / 1e9, 1) == 6.6
    assert round(ce["active_per_token"] / 1e9, 2) == 4.12
    stock_mha, ce_mha = _phi35_counts(32)
    assert round(stock_mha["active_per_token"] / 1e9, 2) == 7.45
    assert round(ce_mha["active_per_token"] / 1e9, 2) == 4.93
    assert 1 - ce_mha["active_per_token"] / stock_mha["active_per_token"] == pytest.approx(0.338, abs=1e-3)
    pure = compressed_experts_parameter_counts(
        stock["total"], moe_layers=32, num_experts=16, top_k=2, k_main=1,
        expert_params=expert_parameters(4096, 6400), vector_params=compressed_vector_parameters(4096, 6400))
    assert pure["active_topk"] == stock["active_per_token"]
    assert pure["active_compressed"] == ce["active_per_token"]
    assert pure["total_compressed"] == ce["total"]


# ----------------------------------------------------------------------------------- finetune
def _compressed_tiny(family="olmoe", top_k=4, k_main=2):
    model = _model(family, top_k)
    for view in moe_layer_views(model):
        set_moe_block(model, view.layer_index, CompressedExpertsBlock(view.block, model.config, k_main=k_main))
    return model


def _ids(n=16, seq=16, seed=0):
    return torch.randint(0, 512, (n, seq), generator=torch.Generator().manual_seed(seed))


def test_vectors_only_finetune_learns_and_touches_nothing_else():
    model = _compressed_tiny()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "ce_" not in n}
    ids = _ids(4)
    cfg = FinetuneConfig(recipe="vectors", steps=12, batch_size=4, lr=5e-2, warmup_ratio=0.0)
    result = finetune(model, ids, cfg, progress=False)
    assert result.losses[-1] < result.losses[0]
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert any(not torch.all(b.ce_input == 1) for b in model.modules() if hasattr(b, "ce_input"))


def test_resume_continues_bit_for_bit(tmp_path):
    ids = _ids()
    cfg = FinetuneConfig(recipe="vectors", steps=4, batch_size=2, save_every=2, lr=1e-2)
    straight = _compressed_tiny()
    full = finetune(straight, ids, cfg, state_dir=tmp_path / "a", progress=False)
    first = _compressed_tiny()
    finetune(first, ids, FinetuneConfig(recipe="vectors", steps=4, batch_size=2, save_every=2, lr=1e-2), state_dir=tmp_path / "b",
             progress=False, keep_state=True)  # as a killed run leaves its checkpoints
    (tmp_path / "b" / "latest").write_text("step-0000002.pt\n")  # as if killed after step 2
    resumed_model = _compressed_tiny()
    resumed = finetune(resumed_model, ids, cfg, state_dir=tmp_path / "b", resume=True, progress=False)
    assert resumed.losses == full.losses
    for (n, a), (_, b) in zip(straight.named_parameters(), resumed_model.named_parameters()):
        assert torch.equal(a, b), n


def test_distillation_teacher_is_the_original_top_k_model():
    original = _model("olmoe", 4)
    ids = _ids(2)
    with torch.no_grad():
        expected = original(input_ids=ids).logits
    teacher = make_teacher(_compressed_tiny(k_main=1), "vectors")
    with torch.no_grad():
        torch.testing.assert_close(teacher(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    model = _compressed_tiny(k_main=1)
    result = finetune(model, ids, FinetuneConfig(steps=8, batch_size=2, lr=5e-2, distill=True), progress=False)
    assert result.losses[-1] < result.losses[0]


def test_finetune_errors_and_schedule(tmp_path):
    with pytest.raises(FinetuneError, match="no compressed-expert vectors"):
        finetune(_model("olmoe", 2), _ids(2), FinetuneConfig(steps=1), progress=False)
    with pytest.raises(FinetuneError, match="--train must be one of"):
        FinetuneConfig(train="experts")
    assert lr_factor(0, 100, 0.03) == pytest.approx(1 / 3) and lr_factor(3, 100, 0.03) == pytest.approx(1.0)
    assert lr_factor(99, 100, 0.03) < 0.01
    png = plot_losses([3.0, 2.5, 2.0, 1.8], tmp_path / "loss.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_paper_recipe_resolves_to_the_released_schedule_and_explicit_options_win():
    cfg = FinetuneConfig(recipe="paper")
    assert (cfg.train, cfg.peak_lr, cfg.epochs, cfg.steps, cfg.warmup_ratio, cfg.adam_beta2, cfg.batch_size) == \
        ("all", 2e-5, 2.0, None, 0.03, 0.999, 8)
    assert cfg.total_steps(100) == 25  # ceil(2 epochs x 100 sequences / batch 8)
    mine = FinetuneConfig(recipe="paper", steps=10, lr=1e-4)
    assert (mine.steps, mine.epochs, mine.peak_lr, mine.train) == (10, None, 1e-4, "all")
    default = FinetuneConfig()
    assert (default.recipe, default.train, default.distill, default.steps, default.peak_lr, default.aux_lr) == \
        ("distill", "vectors", True, 200, 3e-3, 1e-3)
    vectors = FinetuneConfig(recipe="vectors")  # the previous default, now explicit
    assert (vectors.train, vectors.distill, vectors.steps, vectors.peak_lr, vectors.adam_beta2) == \
        ("vectors", False, 200, 1e-2, 0.95)
    assert FinetuneConfig(recipe="paper").distill is False
    with pytest.raises(FinetuneError, match="--recipe must be one of distill, vectors, paper"):
        FinetuneConfig(recipe="sft")
    with pytest.raises(FinetuneError, match="--steps or --epochs, not both"):
        FinetuneConfig(steps=3, epochs=1.0)


def test_epochs_visit_every_sequence_once_per_epoch_in_a_fresh_order():
    cfg = FinetuneConfig(recipe="paper", batch_size=4)
    gen = torch.Generator().manual_seed(0)
    epoch0 = torch.cat([batch_rows(s, 12, cfg, gen) for s in range(3)])
    epoch1 = torch.cat([batch_rows(s, 12, cfg, gen) for s in range(3, 6)])
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == list(range(12))
    assert not torch.equal(epoch0, epoch1)
    assert torch.equal(batch_rows(4, 12, cfg, torch.Generator().manual_seed(9)), epoch1[4:8])  # resumable


def test_paper_recipe_trains_the_whole_model_with_the_vectors():
    model = _compressed_tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = FinetuneConfig(recipe="paper", batch_size=4, lr=1e-3)  # a larger lr than 2e-5 so 2 epochs show
    result = finetune(model, _ids(8), cfg, progress=False)
    assert result.steps == 4 and result.trainable_parameters == sum(p.numel() for p in before.values())
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any("ce_" in n for n in moved) and any("experts" in n for n in moved) and any("attn" in n for n in moved)


def test_vectors_lr_gives_the_vectors_their_own_peak_lr():
    model = _compressed_tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = FinetuneConfig(recipe="paper", steps=3, batch_size=4, lr=1e-9, vectors_lr=5e-2, warmup_ratio=0.0)
    finetune(model, _ids(8), cfg, progress=False)
    step = {n: float((p - before[n]).abs().max()) for n, p in model.named_parameters()}
    assert min(v for n, v in step.items() if "ce_" in n) > 1e-3  # Adam steps of size ~lr
    assert max(v for n, v in step.items() if "ce_" not in n) < 1e-7
    with pytest.raises(FinetuneError, match="vectors lr must be > 0"):
        FinetuneConfig(vectors_lr=0.0)


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])
@pytest.mark.parametrize("tokens", [5, 300])  # few rows per expert (stacked gate+up) and many (separate)
def test_every_expert_path_gives_the_same_outputs(family, tokens, monkeypatch):
    """grouped GEMM vs per-expert matmuls, stacked gate+up vs separate: the same numbers."""
    from moepress.modeling import moepress_compressed

    model = _model(family, 4)
    view = moe_layer_views(model)[0]
    block = CompressedExpertsBlock(view.block, model.config, k_main=2)
    _randomise_vectors(block)
    x = torch.randn(tokens, view.hidden_size)
    with torch.no_grad():
        reference = _run(block, x)
        for stacked in (0, 10**6):
            monkeypatch.setattr(moepress_compressed, "STACKED_ROWS_PER_EXPERT", stacked)
            torch.testing.assert_close(_run(block, x), reference, atol=1e-5, rtol=1e-5)
            monkeypatch.setattr(moepress_compressed, "_grouped_mm_usable", lambda a, b: False)
            torch.testing.assert_close(_run(block, x), reference, atol=1e-5, rtol=1e-5)
            monkeypatch.undo()


# ------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("family,top_k", [("olmoe", 4), ("gpt_oss", 2), ("deepseek_v3", 2)])
def test_compress_save_reload_same_logits(tmp_path, family, top_k):
    import moepress

    model = _model(family, top_k)
    # the paper's block reads no statistics: no calibration text and no tokenizer are needed
    result = moepress.compress(model, "compressed_experts", ratio=0.5, aux_width=None)
    assert result.tokenizer is None and result.record["calibration"] is None
    for block in result.model.modules():
        if isinstance(block, CompressedExpertsBlock):
            _randomise_vectors(block)  # as if fine-tuned: the vectors must survive the round trip
    out = result.save(tmp_path / "out")
    ids = _ids(2)
    with torch.no_grad():
        expected = result.model(input_ids=ids).logits
        reloaded = moepress.load(out)(input_ids=ids).logits
        remote = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        torch.testing.assert_close(reloaded, expected)
        torch.testing.assert_close(remote(input_ids=ids).logits, expected)
    kinds = [(m.kind, m.k_main) for m in remote.modules() if getattr(m, "kind", "") == "compressed_experts"]
    assert kinds == [("compressed_experts", top_k // 2)] * 2  # both MoE layers, custom code from the checkpoint


def test_distillation_from_a_given_teacher_trains_a_stock_model():
    """`teacher=` distils a model without Compressed Experts blocks (the stock top-k/2 baseline of a
    fair comparison); the teacher stays frozen, and at its own logits the loss is zero."""
    teacher = _model("olmoe", 4)
    ids = _ids(2)
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    same = _model("olmoe", 4)
    r0 = finetune(same, ids, FinetuneConfig(steps=1, batch_size=2, lr=1e-9, train="all", distill=True),
                  progress=False, teacher=teacher)
    assert r0.losses[0] == pytest.approx(0.0, abs=1e-6)
    student = _model("olmoe", 4)
    student.config.num_experts_per_tok = 2
    for view in moe_layer_views(student):
        view.router.top_k = 2
    from moepress.methods.compressed_experts.finetune import distillation_loss

    def kl():
        with torch.no_grad():
            return float(distillation_loss(student(input_ids=ids).logits, teacher(input_ids=ids).logits, 1.0))

    start = kl()
    finetune(student, ids, FinetuneConfig(epochs=4, batch_size=4, lr=1e-4, train="all", distill=True,
                                           holdout=0.0),
             progress=False, teacher=teacher)
    assert start > 1e-4 and kl() < start
    for n, p in teacher.named_parameters():
        assert torch.equal(p, before[n]) and not p.requires_grad, n
