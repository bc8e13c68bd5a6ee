"""Stock MoE blocks with their own routed-expert count: per-layer counts in one checkpoint.

Ships inside checkpoints (torch + transformers only). No supported family's config can give each
layer its own number of routed experts (mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2/v3,
phimoe and gpt_oss all have one count key), so a result whose layers keep different counts (a
per-layer budget, or `--layers` with pruning) is saved with the stock config's count (the original
one) and `config.moepress["layers"][i] = {"kind": "experts", "num_experts": m}` for each layer
whose block differs; loading builds that layer's block as the family's own class with m experts.
The block is the stock one (same forward, same checkpoint keys), only its size differs.
"""

from __future__ import annotations

import copy

from torch import nn

from .moepress_family import family_facts


class StockExpertCount:
    """Builder of a family's stock MoE block with `num_experts` routed experts (kind "experts")."""

    kind = "experts"

    @classmethod
    def from_layer_config(cls, stock: nn.Module, config, layer_cfg: dict) -> nn.Module:
        """An empty stock block like `stock`, sized for `layer_cfg["num_experts"]` (weights come later)."""
        cfg = copy.deepcopy(config)
        setattr(cfg, family_facts(config.model_type).expert_count_key, int(layer_cfg["num_experts"]))
        return type(stock)(cfg)

    @staticmethod
    def layer_config(num_experts: int) -> dict:
        return {"kind": StockExpertCount.kind, "num_experts": int(num_experts)}


KINDS = {StockExpertCount.kind: StockExpertCount}
