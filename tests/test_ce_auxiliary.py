"""Compressed Experts with auxiliary mini-experts (`aux_width`, our addition; methods/compressed_experts)."""

from __future__ import annotations

import pytest
import torch
import transformers

from moepress.arch import moe_layer_views, parameter_counts, set_moe_block
from moepress.testing import tiny_model
from moepress.calib.stats import LayerStatistics
from moepress.methods import ConfigError, LayerContext, build_method
from moepress.modeling.moepress_compressed import CompressedExpertsBlock
from moepress.ops.accounting import compressed_vector_parameters, expert_parameters

# biased clamped SwiGLU (gpt-oss), softmax without renormalisation (olmoe), group-limited sigmoid
# routing with shared experts (deepseek_v3), renormalised softmax (qwen3_moe)
FAMILIES = ["olmoe", "gpt_oss", "deepseek_v3", "qwen3_moe"]


def _model(family: str, top_k: int = 4, seed: int = 0):
    return tiny_model(family, seed=seed, num_experts_per_tok=top_k)


def _run(block, x):
    out = block(x.unsqueeze(0))
    return (out[0] if isinstance(out, tuple) else out).reshape(x.shape)


def _fitted(view, model, x, **options):
    method = build_method("compressed_experts", **options)
    ctx = LayerContext(view, LayerStatistics(view, [x]), 0, 1, model)
    return method.compress_layer(ctx)


def _randomise_vectors(block, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        block.ce_input.copy_(1 + 0.5 * torch.randn(block.ce_input.shape, generator=g))
        block.ce_intermediate.copy_(1 + 0.5 * torch.randn(block.ce_intermediate.shape, generator=g))


@pytest.mark.parametrize("family", FAMILIES)
def test_full_width_mini_experts_give_back_the_stock_top_k_block(family):
    """aux_width = I keeps every neuron and the fit is exact: the block is the stock top-k block."""
    model = _model(family)
    view = moe_layer_views(model)[0]
    x = torch.randn(256, view.hidden_size)
    result = _fitted(view, model, x, k_main=1, aux_width=view.intermediate_size)
    assert sum(result.record["aux_fit_tokens"]) > 0
    held_out = torch.randn(64, view.hidden_size)  # exact everywhere, not only on the fitted tokens
    with torch.no_grad():
        torch.testing.assert_close(_run(result.block, held_out), view.forward(held_out), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])
def test_zero_mini_experts_are_the_paper_block(family):
    model = _model(family)
    view = moe_layer_views(model)[0]
    paper = CompressedExpertsBlock(view.block, model.config, k_main=2)
    extended = CompressedExpertsBlock(view.block, model.config, k_main=2, aux_width=3)
    _randomise_vectors(paper)
    _randomise_vectors(extended)  # same seed: same vectors; the mini-experts start at zero
    x = torch.randn(32, view.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(_run(extended, x), _run(paper, x))


def _layer_error(block, view, x):
    with torch.no_grad():
        return float((_run(block, x) - view.forward(x)).pow(2).sum() / view.forward(x).pow(2).sum())


def test_wider_mini_experts_approach_the_top_k_output():
    model = _model("olmoe")
    view = moe_layer_views(model)[0]
    x = torch.randn(512, view.hidden_size)
    paper = _fitted(view, model, x, k_main=1, aux_width=None).block
    errors = [_layer_error(paper, view, x)]
    for width in (0, 4, view.intermediate_size // 2, view.intermediate_size):
        errors.append(_layer_error(_fitted(view, model, x, k_main=1, aux_width=width).block, view, x))
    assert errors == sorted(errors, reverse=True) and errors[0] > 0.05, errors  # each wider fit is closer
    assert errors[-1] < 1e-9


def test_fit_uses_only_tokens_where_the_expert_is_auxiliary():
    model = _model("olmoe")
    view = moe_layer_views(model)[0]
    x = torch.randn(128, view.hidden_size)
    routing = view.route(x)
    order = routing.weights.argsort(dim=-1, descending=True, stable=True)
    aux = routing.index.gather(-1, order)[:, 2:]
    expected = [int((aux == j).any(-1).sum()) for j in range(view.num_experts)]
    record = _fitted(view, model, x, k_main=2, aux_width=2).record
    assert record["aux_fit_tokens"] == expected and record["aux_width"] == 2


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])
def test_gradients_reach_the_mini_experts_and_grouped_paths_agree(monkeypatch, family):
    from moepress.modeling import moepress_compressed

    model = _model(family)
    view = moe_layer_views(model)[0]
    x = torch.randn(64, view.hidden_size)
    block = _fitted(view, model, x, k_main=2, aux_width=4).block
    _randomise_vectors(block)
    out = _run(block, x)
    out.pow(2).sum().backward()
    for name in ("aux_gate_up", "aux_down", "aux_bias") + (("aux_gate_up_bias",) if block.biased else ()):
        assert getattr(block, name).grad.abs().sum() > 0, name
    with torch.no_grad():
        for rows in (0, 10**6):  # grouped GEMMs (many pairs per expert) and gathered weights (few)
            monkeypatch.setattr(moepress_compressed, "STACKED_ROWS_PER_EXPERT", rows)
            torch.testing.assert_close(_run(block, x), out.detach(), atol=1e-5, rtol=1e-5)
            monkeypatch.setattr(moepress_compressed, "_grouped_mm_usable", lambda a, b: False)  # per-expert matmuls
            torch.testing.assert_close(_run(block, x), out.detach(), atol=1e-5, rtol=1e-5)
            monkeypatch.undo()


def test_accounting_counts_the_mini_experts_as_active():
    model = _model("qwen3_moe")
    views = moe_layer_views(model)
    before = parameter_counts(model)
    x = torch.randn(64, model.config.hidden_size)
    for pos, view in enumerate(views):
        set_moe_block(model, view.layer_index, _fitted(view, model, x, ratio=0.5, aux_width=3).block)
    after = parameter_counts(model)
    h, i = model.config.hidden_size, model.config.moe_intermediate_size
    compressed = compressed_vector_parameters(h, i) + 3 * 3 * h + h  # vectors + width-3 mini-expert + bias
    assert after["total"] == before["total"] + len(views) * 8 * compressed
    assert after["active_per_token"] == before["active_per_token"] - len(views) * 2 * (expert_parameters(h, i) - compressed)


def test_options_and_calibration_need():
    assert not build_method("compressed_experts", aux_width=None).requirements().calibration  # the paper fits nothing
    assert build_method("compressed_experts", aux_width="none").config.aux_width is None
    assert build_method("compressed_experts", aux_width=0).requirements().calibration
    default = build_method("compressed_experts")  # issue 23: the fitted mini-experts lead, at width I/8
    assert default.config.aux_width == "auto" and default.requirements().calibration
    assert [default.config.resolve_aux_width(i) for i in (256, 192, 20, 3)] == [32, 24, 2, 1]
    with pytest.raises(ConfigError, match="aux_width must be auto, none or a width"):
        build_method("compressed_experts", aux_width="wide")
    with pytest.raises(ConfigError, match="aux_width must be >= 0"):
        build_method("compressed_experts", aux_width=-1)
    with pytest.raises(ConfigError, match="aux_ridge"):
        build_method("compressed_experts", aux_width=2, aux_ridge=-1.0)
    model = _model("olmoe")
    view = moe_layer_views(model)[0]
    with pytest.raises(ConfigError, match="wider than the experts"):
        _fitted(view, model, torch.randn(8, view.hidden_size), aux_width=view.intermediate_size + 1)


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])
def test_compress_save_reload_keeps_the_mini_experts(tmp_path, family, calib_file, tokenizer):
    import moepress

    model = _model(family)
    result = moepress.compress(model, "compressed_experts", ratio=0.5, aux_width=2, calib=calib_file, samples=4,
                               seq_len=32, tokenizer=tokenizer)
    blocks = [m for m in result.model.modules() if isinstance(m, CompressedExpertsBlock)]
    assert blocks and all(b.aux_width == 2 and b.aux_down.abs().sum() > 0 for b in blocks)
    out = result.save(tmp_path / "out")
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = result.model(input_ids=ids).logits
        torch.testing.assert_close(moepress.load(out)(input_ids=ids).logits, expected)
        remote = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        torch.testing.assert_close(remote(input_ids=ids).logits, expected)
    assert {m.aux_width for m in remote.modules() if getattr(m, "kind", "") == "compressed_experts"} == {2}


def test_fit_modes_and_bias_option():
    """`aux_fit` widens the fitted tokens (routed: any rank of the top-k; all: every token by score) and
    `aux_bias=False` keeps the expert's own down bias (zero here) instead of fitting one."""
    model = _model("olmoe")
    view = moe_layer_views(model)[0]
    x = torch.randn(96, view.hidden_size, generator=torch.Generator().manual_seed(3))
    tokens = {mode: sum(_fitted(view, model, x, ratio=0.5, aux_width=2, aux_fit=mode).record["aux_fit_tokens"])
              for mode in ("auxiliary", "routed", "all")}
    assert tokens["auxiliary"] == 96 * 2 and tokens["routed"] == 96 * 4 and tokens["all"] == 96 * view.num_experts
    plain = _fitted(view, model, x, ratio=0.5, aux_width=2, aux_bias=False).block
    assert torch.count_nonzero(plain.aux_bias) == 0 and plain.aux_down.abs().sum() > 0
    with pytest.raises(ConfigError, match="aux_fit must be one of"):
        build_method("compressed_experts", aux_width=2, aux_fit="some")


def test_default_finetune_distils_into_vectors_and_mini_experts_at_their_own_lr():
    from moepress.methods.compressed_experts.finetune import FinetuneConfig, finetune, mini_experts

    model = _model("olmoe")
    x = torch.randn(64, model.config.hidden_size)
    views = moe_layer_views(model)
    for view in views:
        set_moe_block(model, view.layer_index, _fitted(view, model, x, ratio=0.5, aux_width=2).block)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 512, (5, 16), generator=torch.Generator().manual_seed(0))
    result = finetune(model, ids, FinetuneConfig(steps=3, batch_size=4), progress=False)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(("ce_" in n or "aux_" in n) for n in moved) and any("aux_down" in n for n in moved)
    assert len(mini_experts(model)) == 3 * len(views)  # gate_up, down, bias per block
    assert result.losses[0] > 0 and result.validation  # KL to the original top-k model, held out too
