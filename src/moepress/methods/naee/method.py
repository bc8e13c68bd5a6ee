from __future__ import annotations

import torch

from ...ops.saliency import naee_search
from ..base import LayerContext
from ..pruning import PruningMethod
from .config import NaeeConfig


class NaeePruning(PruningMethod):
    """NAEE layer-wise expert pruning.

    Loss of a kept subset S: `Σ_x ||MoE(x) - MoE_S(x)||²` over calibration tokens, where MoE_S
    routes with the model's own router restricted to S (the router's rows sliced, as in the
    exported checkpoint). Shared experts are identical on both sides and cancel.

    Deviation (stated): the loss uses the first `max_tokens` calibration tokens of the layer
    (the paper uses all of them) so that all experts' outputs fit in memory; and above
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
        x = torch.cat(stats.batches)[:local] if local else None
        with torch.no_grad():
            local_loss = _subset_loss(view, x) if x is not None else lambda subset: 0.0

            def loss(subset: list[int]) -> float:
                return stats.reduce(local_loss(subset))

            keep, search, evaluations = naee_search(view.num_experts, m, loss, self.config.max_subsets)
            best = loss(keep)
        return keep, {"search": search, "subsets_evaluated": evaluations, "loss": best,
                      "loss_tokens": min(stats.num_tokens, self.config.max_tokens)}


def _subset_loss(view, x: torch.Tensor):
    """`loss(subset) = Σ_x ||MoE(x) − MoE_S(x)||²` over the tokens `x` (all experts' outputs held once)."""
    outputs = torch.stack([view.expert(j, x) for j in range(view.num_experts)])  # [E, T, H]
    full = view.routed_output(x, view.route(x)).double()
    tokens = torch.arange(x.shape[0], device=x.device).unsqueeze(1)

    def loss(subset: list[int]) -> float:
        _, weights, index = view.subset_router(subset)(x)
        chosen = outputs[torch.as_tensor(subset, device=index.device)[index], tokens]  # [T, k, H]
        approx = (weights.unsqueeze(-1).to(chosen.dtype) * chosen).sum(1).double()
        return float(((full - approx) ** 2).sum())

    return loss
