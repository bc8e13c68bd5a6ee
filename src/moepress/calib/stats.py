"""Per-layer calibration statistics, computed once and cached (docs/design.md#pipeline).

`LayerStatistics` holds the flat inputs of one MoE layer on the calibration tokens (a list of
`[t, H]` batches, the post-attention-norm hidden states; packing means no padding token is ever
among them) and computes named statistics on demand, each once, streaming over the batches with
fp32/fp64 accumulators. Statistics are sums over tokens, so batching never changes them.

Data parallel (`torchrun`, `moepress.distributed`): each rank holds the MoE inputs of its own
shard of the calibration sequences, and this class is the one reduction point. A statistic
registered with `summed=True` (the default: its value is a sum over tokens, a tensor or a
dict/list of them) is all-reduced right after it is computed, so every rank reads the
whole-calibration value. A statistic or fit that is not a plain sum (a mean, a normalised Gram,
a loss compared across candidates) reduces its sums itself with `stats.reduce(...)` before the
non-linear step, and registers with `summed=False`. `num_tokens` is the global count and
`token_offset` the global index of this rank's first token. In one process all of it is the
identity.

A method package registers its own statistics with `@statistic("name")` (e.g. `methods/reap/stats.py`).
Accumulators live on the device of the layer inputs (`stats.device`), so on a GPU the sums are
formed there.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from .. import distributed
from ..arch import MoELayerView, Routing

MISSING = object()  # what a statistics cache (`moepress.run.cache`) returns for a value it does not hold

_STATISTICS: dict[str, Callable[["LayerStatistics"], object]] = {}
_SUMMED: set[str] = set()
_NOT_CACHEABLE: set[str] = set()


def statistic(name: str, summed: bool = True, cacheable: bool = True):
    """Register `fn(stats: LayerStatistics) -> value` as statistic `name`.

    summed: the value is a sum over calibration tokens (tensor or nested dict/list of tensors), so
        data-parallel ranks all-reduce it; False for per-rank data ("routing") or a statistic that
        calls `stats.reduce` on its own sums before a non-linear step.
    cacheable: the value may be kept in the statistics cache (`moepress.run.cache`): it depends
        only on the layer's weights and inputs (no method option) and is the same on every rank.
        False for per-rank data ("routing").
    """

    def wrap(fn):
        _STATISTICS[name] = fn
        if cacheable:
            _NOT_CACHEABLE.discard(name)
        else:
            _NOT_CACHEABLE.add(name)
        if summed:
            _SUMMED.add(name)
        else:
            _SUMMED.discard(name)
        return fn

    return wrap


class LayerStatistics:
    """Cached statistics of one MoE layer.

    Args:
        view: the layer's view (routing uses the model's own router).
        batches: flat MoE-layer inputs, a list of `[t, H]` tensors.
        disk: optional `run.cache_keys.LayerCache`: cacheable statistics are read from it when there
            and written to it once computed (already reduced over ranks).
        num_tokens: the global token count when `batches` is empty because every statistic the
            method reads comes from `disk` (the inputs were not propagated at all).
    """

    def __init__(self, view: MoELayerView, batches: list[torch.Tensor], disk=None, num_tokens: int | None = None):
        self.view = view
        self.batches = batches
        self.disk = disk
        self._cache: dict[str, object] = {}
        self.local_tokens = sum(b.shape[0] for b in batches)
        self.without_inputs = num_tokens is not None and not batches
        if self.without_inputs:
            self.num_tokens, self.token_offset = int(num_tokens), 0
            return
        per_rank = distributed.counts_by_rank(self.local_tokens)  # one collective, at construction
        self.num_tokens = sum(per_rank)  # over all ranks
        self.token_offset = sum(per_rank[: distributed.rank()])

    @property
    def device(self) -> torch.device:
        """Where accumulators live: the device of the layer inputs (else of the router)."""
        if self.batches:
            return self.batches[0].device
        return next(self.view.router.parameters()).device

    def __getitem__(self, name: str):
        if name not in self._cache:
            if name not in _STATISTICS:
                raise KeyError(f"unknown statistic {name!r}; known: {sorted(_STATISTICS)}")
            cached = name not in _NOT_CACHEABLE and self.disk is not None
            value = self.disk.load(name) if cached else MISSING
            if value is MISSING:
                if self.without_inputs:
                    raise RuntimeError(f"statistic {name!r} is not in the statistics cache and the layer inputs were "
                                       f"not propagated; the method must list it in `needs` and set "
                                       f"reads_inputs=True if it reads anything else")
                with torch.no_grad():  # statistics are sums of forwards, never differentiated
                    value = _STATISTICS[name](self)
                value = self.reduce(value) if name in _SUMMED else value
                if cached:
                    self.disk.save(name, value)
            self._cache[name] = value
        return self._cache[name]

    @staticmethod
    def reduce(value):
        """Sum `value` over data-parallel ranks; identity in one process.

        Accepts a tensor (reduced in place), a Python number, an object with `summed(reduce)`
        (e.g. `ops.least_squares.NormalEquations`), or a dict/list/tuple of those. Every rank must
        call it at the same point with values of the same shapes."""
        if not distributed.is_distributed():
            return value
        if isinstance(value, torch.Tensor):
            return distributed.all_reduce_sum(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return distributed.all_reduce_number(value)
        if isinstance(value, dict):
            return {k: LayerStatistics.reduce(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(LayerStatistics.reduce(v) for v in value)
        if hasattr(value, "summed"):
            return value.summed(LayerStatistics.reduce)
        raise TypeError(f"cannot sum a {type(value).__name__} over ranks")

    def routed(self) -> Iterator[tuple[torch.Tensor, Routing]]:
        """Yield `(x [t,H], routing)` per batch, routed with the model's own router.

        The routing is the cached statistic "routing": every statistic and fit of this layer
        reads the same router outputs, computed once."""
        yield from zip(self.batches, self["routing"])


def cacheable(name: str) -> bool:
    """Whether statistic `name` may be kept in the statistics cache (see `statistic`)."""
    return name in _STATISTICS and name not in _NOT_CACHEABLE


@statistic("routing", summed=False, cacheable=False)
def layer_routing(stats: LayerStatistics) -> list[Routing]:
    """The model's own routing of every batch (one router pass per layer, however many readers).

    Memory per batch of `t` tokens: logits and scores `[t, E]`, weights and index `[t, k]`.
    """
    with torch.no_grad():
        return [stats.view.route(x) for x in stats.batches]


@statistic("frequency")
def expert_frequency(stats: LayerStatistics) -> torch.Tensor:
    """`[E]` float64: number of calibration tokens whose top-k contains expert j."""
    counts = torch.zeros(stats.view.num_experts, dtype=torch.float64, device=stats.device)
    for _, r in stats.routed():
        counts += torch.bincount(r.index.flatten(), minlength=stats.view.num_experts).to(counts)
    return counts


@statistic("routing_weight_sum")
def routing_weight_sum(stats: LayerStatistics) -> torch.Tensor:
    """`[E]` float64: sum over tokens of the routing weight each expert receives (0 if not routed)."""
    total = torch.zeros(stats.view.num_experts, dtype=torch.float64, device=stats.device)
    for _, r in stats.routed():
        total.index_add_(0, r.index.flatten().to(total.device), r.weights.flatten().to(total))
    return total
