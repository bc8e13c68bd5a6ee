"""The uniform MoE layer view reproduces each family's own block (docs/design.md#arch, docs/algorithms.md#layer-view)."""

from __future__ import annotations

import pytest
import torch

from moepress.arch import (
    UnsupportedArchitecture, family_of, moe_layer_views, parameter_counts, set_model_expert_count,
    set_moe_block,
)
from moepress.testing import tiny_model

from moepress.arch import SUPPORTED as FAMILIES


def _router_io(model, ids):
    """Inputs and outputs of every router during a real forward of the model."""
    seen = []
    hooks = [v.router.register_forward_hook(lambda m, a, o: seen.append((a[0].detach(), o)))
             for v in moe_layer_views(model)]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_route_matches_model_router(family):
    model = tiny_model(family)
    ids = torch.randint(0, 512, (2, 9))
    seen = _router_io(model, ids)
    views = moe_layer_views(model)
    assert len(seen) == len(views)
    for view, (x, (logits, weights, index)) in zip(views, seen):
        r = view.route(x.reshape(-1, x.shape[-1]))
        torch.testing.assert_close(r.logits, logits)
        torch.testing.assert_close(r.weights, weights)
        assert torch.equal(r.index, index)
        assert r.scores.shape == logits.shape


@pytest.mark.parametrize("family", FAMILIES)
def test_per_expert_view_reproduces_block(family):
    model = tiny_model(family)
    view = moe_layer_views(model)[0]
    x = torch.randn(7, view.hidden_size)
    with torch.no_grad():
        r = view.route(x)
        manual = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for s in range(view.top_k):
                manual[t] += r.weights[t, s] * view.expert(int(r.index[t, s]), x[t : t + 1])[0]
        shared = view.shared_output(x)
        total = manual + (shared if shared is not None else 0)
        torch.testing.assert_close(manual, view.routed_output(x, r), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(total, view.forward(x), atol=1e-5, rtol=1e-5)
    assert view.gate_proj.shape == (view.num_experts, view.intermediate_size, view.hidden_size)
    assert view.down_proj.shape == (view.num_experts, view.hidden_size, view.intermediate_size)


@pytest.mark.parametrize("family", FAMILIES)
def test_rebuild_with_all_experts_is_identity_and_select_prunes(family):
    model = tiny_model(family)
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
        for view in moe_layer_views(model):
            set_moe_block(model, view.layer_index, view.select(list(range(view.num_experts))))
        assert torch.equal(model(ids).logits, before)
        for view in moe_layer_views(model):
            set_moe_block(model, view.layer_index, view.select([1, 2, 5, 6]))
        set_model_expert_count(model, 4)
        after = model(ids).logits
    assert after.shape == before.shape and not torch.allclose(after, before)
    counts = parameter_counts(model)
    assert set(counts["experts_per_layer"].values()) == {4}
    assert counts["routed_experts"] < counts["total"]


def test_deepseek_dense_layers_are_not_moe_layers():
    model = tiny_model("deepseek_v3")
    assert [v.layer_index for v in moe_layer_views(model)] == [1, 2]


def test_unsupported_architecture_names_supported_families():
    import transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2)
    with pytest.raises(UnsupportedArchitecture, match="mixtral.*gpt_oss"):
        family_of(config)


@pytest.mark.parametrize("family", FAMILIES)
def test_select_keeps_exactly_the_chosen_experts_in_every_layout(family):
    """`select` slices the stored tensors directly (no unpack/pack): the new block's experts, biases
    and router rows are the chosen ones of the original, in order, and share no storage with it."""
    from moepress.arch import MoELayerView

    model = tiny_model(family)
    view = moe_layer_views(model)[0]
    keep = [0, 3, 4, 7]
    block = view.select(keep)
    new = MoELayerView(block, view.spec, view.config, view.layer_index)
    for name in ("gate_proj", "up_proj", "down_proj", "gate_bias", "up_bias", "down_bias"):
        old_t, new_t = getattr(view, name), getattr(new, name)
        if old_t is None:
            assert new_t is None
            continue
        assert torch.equal(new_t, old_t[keep]), name
    for name, t in view.router_tensors().items():
        assert torch.equal(new.router_tensors()[name], t[keep]), name
    olds = {t.untyped_storage().data_ptr() for t in view.block.state_dict().values()}
    assert not olds & {t.untyped_storage().data_ptr() for t in block.state_dict().values()}
