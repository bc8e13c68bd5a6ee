from __future__ import annotations

import dataclasses

import torch

from ...ops.saliency import reap_saliency
from ..base import LayerContext, Requirements
from ..pruning import PruningMethod
from .config import ReapConfig
from .stats import reap_sums  # also registers the "reap" statistic


class ReapPruning(PruningMethod):
    """Prune the experts with the lowest REAP saliency (mean over routed tokens of gate x ||E_j(x)||)."""

    name = "reap"
    summary = "prune by router-weighted expert activation norm (REAP); stock checkpoint"
    config_class = ReapConfig
    needs = ("reap",)
    reads_inputs = False  # with the model's own routing weights (renormalize=None); see __init__

    def requirements(self) -> Requirements:
        if self.config.renormalize is None:
            return super().requirements()
        return dataclasses.replace(super().requirements(), reads_inputs=True)  # reap_sums streams the inputs

    def saliency(self, ctx: LayerContext) -> torch.Tensor:
        if self.config.renormalize is None:
            return ctx.stats["reap"]
        return reap_saliency(*reap_sums(ctx.stats, self.config.renormalize))
