"""Per-layer calibration statistics, computed once and cached (DESIGN.md §2 "pipeline").

`LayerStatistics` holds the flat inputs of one MoE layer on the calibration tokens (a list of
`[t, H]` batches, the post-attention-norm hidden states; packing means no padding token is ever
among them) and computes named statistics on demand, each once, streaming over the batches with
fp32/fp64 accumulators. Statistics are sums over tokens, so batching never changes them and a
data-parallel run would all-reduce them.

A method package registers extra statistics with `@statistic("name")`.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from ..arch import MoELayerView, Routing

_STATISTICS: dict[str, Callable[["LayerStatistics"], object]] = {}


def statistic(name: str):
    """Register `fn(stats: LayerStatistics) -> value` as statistic `name`."""

    def wrap(fn):
        _STATISTICS[name] = fn
        return fn

    return wrap


class LayerStatistics:
    """Cached statistics of one MoE layer.

    Args:
        view: the layer's view (routing uses the model's own router).
        batches: flat MoE-layer inputs, a list of `[t, H]` tensors.
    """

    def __init__(self, view: MoELayerView, batches: list[torch.Tensor]):
        self.view = view
        self.batches = batches
        self._cache: dict[str, object] = {}

    @property
    def num_tokens(self) -> int:
        return sum(b.shape[0] for b in self.batches)

    def __getitem__(self, name: str):
        if name not in self._cache:
            if name not in _STATISTICS:
                raise KeyError(f"unknown statistic {name!r}; known: {sorted(_STATISTICS)}")
            self._cache[name] = _STATISTICS[name](self)
        return self._cache[name]

    def routed(self) -> Iterator[tuple[torch.Tensor, Routing]]:
        """Yield `(x [t,H], routing)` per batch, routed with the model's own router."""
        with torch.no_grad():
            for x in self.batches:
                yield x, self.view.route(x)


@statistic("frequency")
def expert_frequency(stats: LayerStatistics) -> torch.Tensor:
    """`[E]` float64: number of calibration tokens whose top-k contains expert j."""
    counts = torch.zeros(stats.view.num_experts, dtype=torch.float64)
    for _, r in stats.routed():
        counts += torch.bincount(r.index.flatten().cpu(), minlength=stats.view.num_experts).double()
    return counts


@statistic("routing_weight_sum")
def routing_weight_sum(stats: LayerStatistics) -> torch.Tensor:
    """`[E]` float64: sum over tokens of the routing weight each expert receives (0 if not routed)."""
    total = torch.zeros(stats.view.num_experts, dtype=torch.float64)
    for _, r in stats.routed():
        total.index_add_(0, r.index.flatten().cpu(), r.weights.flatten().double().cpu())
    return total


def reap_sums(stats: LayerStatistics, renormalize: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stream `Σ_x g_j(x)·||E_j(x)||_2` and routed-token counts per expert (REAP, ALGORITHMS.md §4.4).

    `renormalize`: None = the model's own routing weights; True/False = router scores gathered at
    the top-k, renormalised over it or not (REAP's `renormalize_router_weights`).
    """
    from ..ops.saliency import reap_batch_sums, routed_gate_values

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


@statistic("reap")
def reap_scores(stats: LayerStatistics) -> torch.Tensor:
    """`[E]` REAP saliency with the model's own routing weights."""
    from ..ops.saliency import reap_saliency

    return reap_saliency(*reap_sums(stats))
