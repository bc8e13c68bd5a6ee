"""REAP's statistic (Lasby et al. 2025; docs/algorithms.md#reap): router-weighted expert output norms.

`stats["reap"]` is the saliency with the model's own routing weights; `reap_sums` also serves
REAP's `renormalize_router_weights` variants, which gather router scores at the top-k.
"""

from __future__ import annotations

import torch

from ...calib.stats import LayerStatistics, statistic
from ...ops.saliency import reap_batch_sums, reap_saliency, routed_gate_values


@torch.no_grad()  # a statistic: the expert forwards must not record autograd graphs (nor hand on requires_grad)
def reap_sums(stats: LayerStatistics, renormalize: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stream `Σ_x g_j(x)·||E_j(x)||_2` and routed-token counts per expert (REAP, docs/algorithms.md#reap).

    `renormalize`: None = the model's own routing weights; True/False = router scores gathered at
    the top-k, renormalised over it or not (REAP's `renormalize_router_weights`).
    Returns `(sums [E], counts [E])` float64, summed over data-parallel ranks (`stats.reduce`).
    """
    view, e = stats.view, stats.view.num_experts
    sums = torch.zeros(e, dtype=torch.float64, device=stats.device)
    counts = torch.zeros(e, dtype=torch.float64, device=stats.device)
    for x, r in stats.routed():
        gates = r.weights if renormalize is None else routed_gate_values(r.scores, r.index, renormalize)
        norms = torch.zeros(r.index.shape, dtype=torch.float64, device=x.device)
        for j in r.index.unique().tolist():
            tok, slot = (r.index == j).nonzero(as_tuple=True)
            norms[tok, slot] = view.expert(j, x[tok]).double().norm(dim=-1)
        s, c = reap_batch_sums(gates, r.index, norms, e)
        sums += s
        counts += c
    return stats.reduce(sums), stats.reduce(counts)


@statistic("reap", summed=False)  # a ratio of sums: reap_sums reduces before dividing
def reap_scores(stats: LayerStatistics) -> torch.Tensor:
    """`[E]` REAP saliency with the model's own routing weights."""
    return reap_saliency(*reap_sums(stats))
