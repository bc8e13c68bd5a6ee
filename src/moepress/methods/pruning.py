"""Shared shape of expert-pruning methods: score experts, keep the best M, slice router rows.

The result is the family's stock block with M experts, so the checkpoint loads in plain
transformers (and vLLM). The same M is used in every layer, as in REAP (uniform ratio per layer),
unless a per-layer budget (`--budget auto`) or `--layers` makes the counts differ; then the
checkpoint is a custom one (auto_map) recording each layer's count.
"""

from __future__ import annotations

import torch

from ..arch import moe_layer_views, set_model_expert_count, validate_expert_count
from .base import ConfigError, Finalized, LayerContext, LayerResult, Method


class PruningMethod(Method):
    ratio_help = ("fraction of each layer's routed experts removed (whole experts: round(N x (1 - ratio)) are "
                  "kept), so the same fraction of routed-expert parameters; active parameters per token are "
                  "unchanged")
    export = "stock"
    keeps_expert_count = True

    def kept(self, ctx: LayerContext) -> int:
        m = self.config.kept_experts(ctx.view.num_experts, ctx.view.top_k, ctx.experts)
        try:
            validate_expert_count(ctx.view.config, m)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return m

    def saliency(self, ctx: LayerContext) -> torch.Tensor:
        """`[E]` scores, higher = more important."""
        raise NotImplementedError

    def choose(self, ctx: LayerContext, m: int) -> tuple[list[int], dict]:
        scores = self.saliency(ctx)
        order = sorted(range(len(scores)), key=lambda j: (-float(scores[j]), j))
        return sorted(order[:m]), {"scores": [round(float(s), 6) for s in scores]}

    def compress_layer(self, ctx: LayerContext) -> LayerResult:
        m = self.kept(ctx)
        keep, extra = self.choose(ctx, m)
        block = None if m == ctx.view.num_experts else ctx.view.select(keep)
        record = {"kept": keep, "experts": m, **extra}
        groups = ctx.view.group_routing
        if block is not None and groups is not None and groups.n_group > 1:
            # Group-limited routing groups experts by position: survivors are regrouped contiguously.
            record["note"] = f"group-limited routing: survivors re-formed into {groups.n_group} contiguous groups"
        return LayerResult(block, record)

    def finalize(self, model, records: dict[int, dict]) -> Finalized:
        """One expert count in every MoE layer: the stock config says it. Different counts (a per-layer
        budget, or `--layers`) no family's config can express: the checkpoint becomes a custom one
        whose `config.moepress["layers"]` gives each layer's count (export.custom_layers)."""
        counts = {v.num_experts for v in moe_layer_views(model)}
        if len(counts) == 1:
            set_model_expert_count(model, counts.pop())
            return Finalized(export=self.requirements().export)
        return Finalized(export="custom")
