"""Modeling code for moepress checkpoints whose MoE blocks are not the family's stock block.

Shipped inside such checkpoints and named in `config.auto_map`, so
`AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)` works without moepress
installed; `moepress.load(out)` uses the same classes without trust_remote_code.
Imports only torch and transformers (and its sibling files, copied beside it).

`config.moepress["layers"]` maps a decoder-layer index to `{"kind": ..., **fields}`; the stock
model is built first, then each listed layer's MLP is replaced by the block of that kind.
Tensors are stored under the family's hub names (`moepress_layout.py`); fused keys load too.
"""

from __future__ import annotations

import transformers

from .moepress_common import MoepressBlock
from .moepress_compressed import KINDS as _COMPRESSED_KINDS
from .moepress_delta import KINDS as _DELTA_KINDS
from .moepress_experts import KINDS as _EXPERT_COUNT_KINDS
from .moepress_family import FAMILY_FACTS, family_facts
from .moepress_layout import register_hub_layout
from .moepress_lowrank import KINDS as _LOWRANK_KINDS
from .moepress_quant import apply_quant_layout
from .moepress_remap import KINDS as _REMAP_KINDS

# kind -> class with `from_layer_config(stock, config, layer_cfg)` (a MoepressBlock, or for "experts" the
# stock block class resized: moepress_experts.py)
BLOCK_KINDS: dict[str, type] = {**_REMAP_KINDS, **_DELTA_KINDS, **_COMPRESSED_KINDS, **_LOWRANK_KINDS,
                                **_EXPERT_COUNT_KINDS}


def describe_block(block, config, *, stock_always: bool = False) -> dict | None:
    """The one description of a layer's block, as `config.moepress["layers"][i]` holds it (and the
    layer store's progress file, to rebuild a finished layer on resume): a moepress block's
    `layer_config()` (with `quant` when its experts are quantized); a stock MoE block whose routed
    expert count differs from the config's (any stock MoE block with `stock_always`)
    `{"kind": "experts", "num_experts": m}`; otherwise None (the stock block the config builds)."""
    if getattr(block, "is_moepress_block", False):
        info = block.layer_config()
        if getattr(block, "moepress_quant", None):  # quantized experts (moepress.quantize)
            info["quant"] = block.moepress_quant
        return info
    fused = getattr(getattr(block, "experts", None), "gate_up_proj", None)
    if fused is None:
        return None
    count = int(fused.shape[0])
    if stock_always or count != getattr(config, family_facts(config.model_type).expert_count_key, None):
        return _EXPERT_COUNT_KINDS["experts"].layer_config(count)
    return None


def rebuild_block(stock, config, layer_cfg: dict):
    """The block `layer_cfg` (a `describe_block` value) describes, built from the layer's stock block
    (its tensors still to be loaded; quantized experts get their packed layout)."""
    kind = layer_cfg["kind"]
    if kind not in BLOCK_KINDS:
        raise ValueError(f"unknown moepress block kind {kind!r}; known: {sorted(BLOCK_KINDS)}")
    block = BLOCK_KINDS[kind].from_layer_config(stock, config, layer_cfg)
    if layer_cfg.get("quant"):  # weight-only quantized experts (moepress_quant.py)
        apply_quant_layout(block, layer_cfg["quant"])
    return block


def install_moepress_blocks(model, config) -> None:
    """Replace the block of every layer listed in `config.moepress["layers"]` by the one it describes."""
    spec = getattr(config, "moepress", None) or {}
    family = family_facts(config.model_type)
    for key, layer_cfg in spec.get("layers", {}).items():
        layer = model.model.layers[int(key)]
        family.set_block(layer, rebuild_block(family.block_of(layer), config, layer_cfg))


def _with_moepress_blocks(base_name: str):
    base = getattr(transformers, base_name)

    class WithMoepressBlocks(base):
        def __init__(self, config):
            super().__init__(config)
            install_moepress_blocks(self, config)

    WithMoepressBlocks.__name__ = WithMoepressBlocks.__qualname__ = f"Moepress{base_name}"
    return WithMoepressBlocks


def class_name_for(model_type: str) -> str:
    """Name of the wrapper class for `model_type` (what `auto_map` points at)."""
    return f"Moepress{family_facts(model_type).causal_lm_class}"


# One wrapper class per family row, as module attributes: auto_map names them (e.g.
# `modeling_moepress.MoepressMixtralForCausalLM`).
for _family in FAMILY_FACTS.values():
    globals()[class_name_for(_family.model_type)] = _with_moepress_blocks(_family.causal_lm_class)
    # checkpoints are written in the family's hub layout (moepress_layout.py): read it back
    register_hub_layout(class_name_for(_family.model_type), _family.model_type)
del _family
