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


def install_moepress_blocks(model, config) -> None:
    """Replace the MLP of every layer listed in `config.moepress["layers"]` by its custom block."""
    spec = getattr(config, "moepress", None) or {}
    family = family_facts(config.model_type)
    for key, layer_cfg in spec.get("layers", {}).items():
        kind = layer_cfg["kind"]
        if kind not in BLOCK_KINDS:
            raise ValueError(f"unknown moepress block kind {kind!r}; known: {sorted(BLOCK_KINDS)}")
        layer = model.model.layers[int(key)]
        block = BLOCK_KINDS[kind].from_layer_config(family.block_of(layer), config, layer_cfg)
        family.set_block(layer, block)
        if layer_cfg.get("quant"):  # weight-only quantized experts (moepress_quant.py)
            apply_quant_layout(block, layer_cfg["quant"])


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
