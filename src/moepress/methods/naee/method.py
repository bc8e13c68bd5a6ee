from __future__ import annotations

import torch

from ...ops.saliency import naee_search
from ..base import LayerContext
from ..subset_loss import SubsetLoss
from ..pruning import PruningMethod
from .config import NaeeConfig


class NaeePruning(PruningMethod):
    """NAEE layer-wise expert pruning.

    Loss of a kept subset S: `Σ_x ||MoE(x) - MoE_S(x)||²` over calibration tokens, where MoE_S
    routes with the model's own router restricted to S (the router's rows sliced, as in the
    exported checkpoint). Shared experts are identical on both sides and cancel.

    Deviation (stated): the loss uses the first `max_tokens` calibration tokens of the layer
    (the paper uses all of them) so that every expert's products with the others on them fit in
    memory (methods/subset_loss.py: `[T, E, E]` float64 per layer); and above
    `max_subsets` subsets the search is greedy backward elimination, recorded as `search`.

    Data parallel: the loss is a sum over tokens, so each rank scores every candidate on its own
    tokens among the first `max_tokens` (shards are contiguous, `stats.token_offset`) and the
    candidate's loss is summed over ranks (one scalar all-reduce per candidate) before comparing;
    every rank then walks the same search.
    """

    name = "naee"
    summary = "prune to the expert subset minimising layer-output error (NAEE); stock checkpoint"
    config_class = NaeeConfig

    def choose(self, ctx: LayerContext, m: int) -> tuple[list[int], dict]:
        view, stats = ctx.view, ctx.stats
        local = max(0, min(stats.local_tokens, self.config.max_tokens - stats.token_offset))
        x = torch.cat(stats.batches)[:local] if local else torch.zeros(0, view.hidden_size)
        with torch.no_grad():
            loss = SubsetLoss(view, x, stats.reduce).squared_error  # summed over data-parallel ranks
            keep, search, evaluations = naee_search(view.num_experts, m, loss, self.config.max_subsets)
            best = loss(keep)
        return keep, {"search": search, "subsets_evaluated": evaluations, "loss": best,
                      "loss_tokens": min(stats.num_tokens, self.config.max_tokens)}


def _subset_loss(view, x: torch.Tensor):
    """`loss(subset) = Σ_x ||MoE(x) − MoE_S(x)||²` over this process's tokens `x` (methods/subset_loss.py)."""
    return SubsetLoss(view, x).local_squared_error
