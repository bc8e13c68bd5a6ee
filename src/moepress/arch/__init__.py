"""All architecture knowledge: family specs, the uniform MoE layer view, model-level helpers."""

from .families import FAMILIES, SUPPORTED
from .model import (
    UnsupportedArchitecture,
    decoder_layers,
    family_of,
    is_stock_moe_block,
    layer_view,
    moe_layer_indices,
    moe_layer_views,
    model_nonzero,
    parameter_counts,
    set_model_expert_count,
    set_moe_block,
    validate_expert_count,
)
from .spec import FamilySpec, GroupRouting
from .view import MoELayerView, Routing, set_expert_count

__all__ = [
    "FAMILIES", "SUPPORTED", "FamilySpec", "GroupRouting", "MoELayerView", "Routing", "UnsupportedArchitecture",
    "decoder_layers", "family_of", "is_stock_moe_block", "layer_view", "moe_layer_indices",
    "model_nonzero", "moe_layer_views", "parameter_counts", "set_expert_count", "set_model_expert_count",
    "set_moe_block", "validate_expert_count",
]
