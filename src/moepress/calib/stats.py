"""Per-layer calibration statistics, computed once and cached (DESIGN.md §2 "pipeline").

`LayerStatistics` holds the flat inputs of one MoE layer on the calibration tokens (a list of
`[t, H]` batches, the post-attention-norm hidden states; packing means no padding token is ever
among them) and computes named statistics on demand, each once, streaming over the batches with
fp32/fp64 accumulators. Statistics are sums over tokens, so batching never changes them and a
data-parallel run would all-reduce them.

A method package registers its own statistics with `@statistic("name")` (e.g. `methods/reap/stats.py`).
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
        """Yield `(x [t,H], routing)` per batch, routed with the model's own router.

        The routing is the cached statistic "routing": every statistic and fit of this layer
        reads the same router outputs, computed once."""
        yield from zip(self.batches, self["routing"])


@statistic("routing")
def layer_routing(stats: LayerStatistics) -> list[Routing]:
    """The model's own routing of every batch (one router pass per layer, however many readers).

    Memory per batch of `t` tokens: logits and scores `[t, E]`, weights and index `[t, k]`.
    """
    with torch.no_grad():
        return [stats.view.route(x) for x in stats.batches]


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
