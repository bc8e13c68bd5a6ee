"""The hub's on-disk layout of every family, taken from transformers' own conversion table.

Ships inside checkpoints (torch + transformers only). In memory transformers 5 holds a layer's
routed experts fused (`mlp.experts.gate_up_proj [E, 2I, H]`); the hub, vLLM, SGLang, llama.cpp's
converter and transformers 4 read the per-expert layout the family was published in
(`block_sparse_moe.experts.{j}.w1.weight` for Mixtral/PhiMoE, `mlp.experts.{j}.gate_proj.weight`
for Qwen/OLMoE/DeepSeek; gpt-oss is fused on the hub too). transformers knows both through
`conversion_mapping.py`: loading applies a family's transforms, `save_pretrained` reverts them, but
only those that were *used* when the model was loaded (`model._weight_conversions`), so a model
loaded from a fused checkpoint, or a moepress class (custom code is skipped), saves fused names.

Here the family's whole table is applied whatever the model's history:
- `to_hub_layout(model, state_dict)` renames an in-memory state dict (whole or one layer) to the
  hub's names, with transformers' own `revert_weight_conversion`;
- `register_hub_layout(class_name, model_type)` gives a moepress class the family's table, so
  `from_pretrained` of a moepress checkpoint reads the hub layout (and still reads fused keys,
  which no transform matches).
In a custom checkpoint the family's renames reach the custom blocks too (Mixtral's `mlp.` becomes
`block_sparse_moe.` for every tensor of the layer), so a block's tensors sit where the serving
engine's model of that family puts its MoE module.
"""

from __future__ import annotations

_MISSING = object()


def hub_conversions(model_type: str) -> list:
    """transformers' weight transforms for `model_type` (a fresh copy; [] when the family's disk and
    memory names agree). Prefix changes are left out: they belong to base-model/task-head loading,
    not to the layout (as transformers itself drops them for models not loaded from a checkpoint)."""
    from transformers import conversion_mapping
    from transformers import core_model_loading

    conversions = conversion_mapping.get_checkpoint_conversion_mapping(model_type) or []
    prefix_change = getattr(core_model_loading, "PrefixChange", None)
    return [c for c in conversions if prefix_change is None or not isinstance(c, prefix_change)]


def to_hub_layout(model, state_dict: dict) -> dict:
    """`state_dict` (in-memory names of `model`, all of it or one layer's) under the hub's names.

    Tensors are not copied where a transform only renames; fused experts are split per expert."""
    from transformers.core_model_loading import revert_weight_conversion

    conversions = hub_conversions(model.config.model_type)
    if not conversions:
        return dict(state_dict)
    saved = model.__dict__.get("_weight_conversions", _MISSING)
    model._weight_conversions = conversions
    try:
        return revert_weight_conversion(model, dict(state_dict))
    finally:
        if saved is _MISSING:
            del model._weight_conversions
        else:
            model._weight_conversions = saved


def use_hub_layout_on_save(model) -> None:
    """Make `model.save_pretrained(d)` (default `save_original_format=True`) write the hub layout,
    also for a model loaded from a fused checkpoint or built as a moepress class."""
    model._weight_conversions = hub_conversions(model.config.model_type) or None


def register_hub_layout(class_name: str, model_type: str) -> None:
    """Let `from_pretrained` of class `class_name` (custom code, which transformers skips) convert
    the hub layout of `model_type` on load."""
    from transformers import conversion_mapping

    conversions = hub_conversions(model_type)
    if conversions:
        conversion_mapping.register_checkpoint_conversion_mapping(class_name, conversions, overwrite=True)
