"""HC-SMoE (Chen et al., ICML 2025, arXiv 2410.08589 §3): output-based hierarchical clustering + merge.

Per layer: every expert is applied to ALL calibration tokens of the layer (not only those routed
to it) and its outputs are averaged over tokens -> one H-dim feature per expert; the N features are
clustered agglomeratively (cosine distance, average linkage as in the released Qwen script) into M
groups; each group is merged by usage-frequency-weighted averaging of W_G, W_U, W_D (no alignment).
Cosine distance with `linkage="ward"` is not Euclidean; scipy rejects it, so ward uses euclidean.
"""

from __future__ import annotations

import torch

from ...calib.stats import LayerStatistics, statistic
from ...ops.clustering import hierarchical_grouping
from ...ops.merging import frequency_weights, uniform_weights
from ..base import LayerContext
from ..merging_common import MergingMethod, average_experts, expert_tensors
from .config import HCSMoEConfig


@statistic("expert_output_mean", summed=False)  # a mean: the sum is reduced before dividing
def expert_output_mean(stats: LayerStatistics) -> torch.Tensor:
    """`[N, H]` fp64: mean over ALL calibration tokens of each expert's output `E_j(x)` (HC-SMoE feature)."""
    view = stats.view
    total = torch.zeros(view.num_experts, view.hidden_size, dtype=torch.float64, device=stats.device)
    with torch.no_grad():
        for x in stats.batches:
            for j in range(view.num_experts):
                total[j] += view.expert(j, x).double().sum(dim=0)
    return stats.reduce(total) / max(stats.num_tokens, 1)


class HCSMoE(MergingMethod):
    name = "hcsmoe"
    summary = "HC-SMoE: hierarchical clustering of expert outputs, frequency-weighted merge"
    config_class = HCSMoEConfig
    needs = ("frequency", "expert_output_mean")

    def merge(self, ctx: LayerContext, m: int):
        features = ctx.stats["expert_output_mean"]
        metric = "euclidean" if self.config.linkage == "ward" else "cosine"
        expert_map = hierarchical_grouping(features, m, linkage=self.config.linkage, metric=metric)
        if self.config.merge == "frequency":
            weights = frequency_weights(ctx.stats["frequency"], expert_map)
        else:
            weights = uniform_weights(expert_map)
        merged = average_experts(expert_tensors(ctx.view), expert_map, weights)
        return expert_map, merged, {"merge_weights": [round(float(w), 6) for w in weights]}
