"""Model-level architecture knowledge: which family, where the decoder layers and MoE blocks are."""

from __future__ import annotations

import torch
from torch import nn

from .families import FAMILIES, SUPPORTED
from .spec import FamilySpec
from .view import MoELayerView, set_expert_count


class UnsupportedArchitecture(ValueError):
    """Raised for a model whose family moepress has no adapter for."""


def family_of(model_or_config) -> FamilySpec:
    """The `FamilySpec` of a model or config; a clear error naming the supported families."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "moepress_base_model_type", None) or getattr(config, "model_type", None)
    spec = FAMILIES.get(model_type)
    if spec is None:
        raise UnsupportedArchitecture(
            f"moepress does not support model_type {model_type!r}. Supported families: "
            f"{', '.join(SUPPORTED)}."
        )
    return spec


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers (`model.model.layers` for every supported family)."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise UnsupportedArchitecture(f"cannot find decoder layers on {type(model).__name__}")
    return layers


def is_stock_moe_block(module: nn.Module, spec: FamilySpec) -> bool:
    """True for the family's own MoE block (fused experts + router), not a dense MLP or a custom block."""
    experts = getattr(module, "experts", None)
    return (
        experts is not None
        and hasattr(experts, "gate_up_proj")
        and hasattr(module, spec.router_attr)
        and not getattr(module, "is_moepress_block", False)
    )


def moe_layer_views(model: nn.Module) -> list[MoELayerView]:
    """A view for every stock MoE block, in layer order (DeepSeek dense layers are skipped)."""
    spec = family_of(model)
    views = []
    for i, layer in enumerate(decoder_layers(model)):
        block = spec.block_of(layer)
        if block is not None and is_stock_moe_block(block, spec):
            views.append(MoELayerView(block, spec, model.config, i))
    if not views:
        raise UnsupportedArchitecture(f"{type(model).__name__} has no MoE layers moepress can see")
    return views


def moe_layer_indices(model: nn.Module) -> list[int]:
    return [v.layer_index for v in moe_layer_views(model)]


def layer_view(model: nn.Module, layer_index: int) -> MoELayerView | None:
    """The view of decoder layer `layer_index`'s MoE block, or None when it is not a stock MoE block."""
    spec = family_of(model)
    block = spec.block_of(decoder_layers(model)[layer_index])
    if block is None or not is_stock_moe_block(block, spec):
        return None
    return MoELayerView(block, spec, model.config, layer_index)


def set_moe_block(model: nn.Module, layer_index: int, block: nn.Module) -> None:
    """Install `block` as the MoE block of decoder layer `layer_index`."""
    family_of(model).set_block(decoder_layers(model)[layer_index], block)


def set_model_expert_count(model: nn.Module, count: int) -> None:
    """Record the routed-expert count of a uniformly pruned model in its config."""
    set_expert_count(model.config, family_of(model), count)


def parameter_counts(model: nn.Module) -> dict:
    """Parameter accounting used in every report (docs/algorithms.md#parameter-accounting: always report both ratios).

    Returns a dict:
        total: every parameter once (tied embeddings counted once);
        routed_experts: parameters of routed experts (shared experts, routers excluded);
        active_per_token: total - routed_experts + per layer the parameters of the experts a token
            runs (top-k experts; custom moepress blocks report their own figure);
        experts_per_layer: {layer index: number of stored routed experts}.
    Custom blocks (modeling/) expose `moepress_parameter_counts() -> (routed, active_routed, experts)`.
    """
    total = sum(p.numel() for p in model.parameters())
    # weight-only quantized experts (modeling/moepress_quant.py) are buffers: count their values too
    total += sum(m.shape.numel() for m in model.modules() if getattr(m, "is_quantized_weight", False))
    spec = family_of(model)
    routed = active_routed = 0
    per_layer = {}
    for i, layer in enumerate(decoder_layers(model)):
        block = spec.block_of(layer)
        if block is None:
            continue
        if hasattr(block, "moepress_parameter_counts"):
            r, a, e = block.moepress_parameter_counts()
        elif is_stock_moe_block(block, spec):
            view = MoELayerView(block, spec, model.config, i)
            e = view.num_experts
            r, a = e * view.parameters_per_expert, view.top_k * view.parameters_per_expert
        else:
            continue
        routed, active_routed = routed + r, active_routed + a
        per_layer[i] = e
    return {
        "total": total,
        "routed_experts": routed,
        "active_per_token": total - routed + active_routed,
        "experts_per_layer": per_layer,
    }


def model_nonzero(model: nn.Module) -> dict | None:
    """`{"total", "routed_experts"}` with the stock routed experts' weights and biases counted by their
    non-zeros, or None when no routed-expert value is exactly zero (a dense model: nothing to add).

    Only stock blocks are counted (custom moepress blocks store factors, not sparsified weights)."""
    dense = nonzero = 0
    with torch.no_grad():
        for i in range(len(decoder_layers(model))):
            view = layer_view(model, i)
            if view is None:
                continue
            for t in (view.gate_proj, view.up_proj, view.down_proj, view.gate_bias, view.up_bias, view.down_bias):
                if t is not None:
                    dense += t.numel()
                    nonzero += int(torch.count_nonzero(t))
    if nonzero == dense:
        return None
    counts = parameter_counts(model)
    return {"total": counts["total"] - dense + nonzero, "routed_experts": counts["routed_experts"] - dense + nonzero}


def validate_expert_count(model_or_config, count: int) -> None:
    """Raise a clear error when `count` routed experts per layer cannot work with the routing."""
    config = getattr(model_or_config, "config", model_or_config)
    top_k = int(config.num_experts_per_tok)
    if count < top_k:
        raise ValueError(f"cannot keep {count} experts: the model routes each token to top-k={top_k}")
    groups = family_of(config).group_routing(config)
    if groups is not None:
        per_group = count // groups.n_group
        if count % groups.n_group or per_group < groups.score_experts or groups.topk_group * per_group < top_k:
            raise ValueError(
                f"group-limited routing needs the expert count divisible by n_group={groups.n_group}, "
                f">= {groups.score_experts} experts per group (a group is scored by its top-{groups.score_experts}) "
                f"and topk_group*experts_per_group >= top-k={top_k}; {count} is not"
            )
