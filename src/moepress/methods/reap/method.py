from __future__ import annotations

import torch

from ...calib.stats import LayerStatistics, statistic
from ...ops.saliency import reap_batch_sums, reap_saliency, routed_gate_values
from ..base import LayerContext
from ..pruning import PruningMethod
from .config import ReapConfig


def reap_sums(stats: LayerStatistics, renormalize: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stream `Σ g_j(x)·||E_j(x)||` and routed counts over the layer's calibration batches."""
    view, e = stats.view, stats.view.num_experts
    sums, counts = torch.zeros(e, dtype=torch.float64), torch.zeros(e, dtype=torch.float64)
    for x, r in stats.routed():
        gates = r.weights if renormalize is None else routed_gate_values(r.scores, r.index, renormalize)
        norms = torch.zeros(r.index.shape, dtype=torch.float64)
        for j in r.index.unique().tolist():
            tok, slot = (r.index == j).nonzero(as_tuple=True)
            norms[tok, slot] = view.expert(j, x[tok]).double().norm(dim=-1).cpu()
        s, c = reap_batch_sums(gates, r.index, norms, e)
        sums += s
        counts += c
    return sums, counts


statistic("reap")(lambda stats: reap_saliency(*reap_sums(stats, None)))


class ReapPruning(PruningMethod):
    """Prune the experts with the lowest REAP saliency (mean over routed tokens of gate x ||E_j(x)||)."""

    name = "reap"
    summary = "prune by router-weighted expert activation norm (REAP); stock checkpoint"
    config_class = ReapConfig
    needs = ("reap",)

    def saliency(self, ctx: LayerContext) -> torch.Tensor:
        if self.config.renormalize is None:
            return ctx.stats["reap"]
        return reap_saliency(*reap_sums(ctx.stats, self.config.renormalize))
