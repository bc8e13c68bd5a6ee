from __future__ import annotations

import torch

from ..base import LayerContext
from ..pruning import PruningMethod


class FrequencyPruning(PruningMethod):
    """Keep the M experts selected most often (top-k membership counts) on the calibration tokens."""

    name = "frequency"
    summary = "prune the least-routed experts (usage counts on calibration data); stock checkpoint"
    needs = ("frequency",)
    reads_inputs = False

    def saliency(self, ctx: LayerContext) -> torch.Tensor:
        return ctx.stats["frequency"]
