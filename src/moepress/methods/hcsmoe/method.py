"""HC-SMoE (Chen et al., ICML 2025, arXiv 2410.08589 §3): output-based clustering + frequency-weighted merge.

Per layer, as the authors' code does it (github.com/wazenmai/HC-SMoE, `hcsmoe/merging/
grouping_mixtral.py` and `clustering.py`, read for this implementation):

1. Features: every expert is applied to ALL calibration tokens of the layer (not only those routed
   to it) and its outputs are averaged over tokens -> one H-dim feature per expert; no normalisation.
2. Clustering into M groups (same M in every layer):
   - `cluster="hierarchical"` (default, the paper's method): agglomerative, average linkage on the
     **Euclidean** distance between features. The authors' `hierarchical_clustering` computes plain
     Euclidean pairwise distances and merges the pair of clusters with the smallest mean pairwise
     distance (UPGMA, = scipy `average`); there is no cluster-size limit on this path (their
     `group_limit` only applies to the frequency-dominant grouping). `metric="cosine"` is kept as an
     option (moepress's earlier default).
   - `cluster="kmeans"`: what the released run scripts actually execute, because they pass the
     misspelt `--cluster="hirarchical"`, which falls through to a K-means with k-means++ seeding and
     column-standardised distances (ops/kmeans.py). Its result depends on the seed (`kmeans_seed`).
3. Merge: each group's W_G, W_U, W_D averaged with weights `f_j / Σ_{k∈C} f_k`, f_j = how often
   expert j is in the top-k on the calibration tokens (no permutation alignment); the router keeps
   its N rows and the group members' routing weights are summed (their code binds every member slot
   to the merged expert, which is the same function).

Remaining differences from the authors' run, and why:
- Statistics come from inputs propagated through the already-merged earlier layers (moepress's
  layer-wise pipeline records `propagation: "compressed"`); their script gathers the inputs of every
  layer, and the frequencies, in one forward pass of the unmerged model.
- Frequencies use the model's own top-k; theirs take `topk(router_logits, 2)` (the same for top-2
  Mixtral). Features are averaged in float64; theirs average bf16 outputs.
- Their K-means leaves an emptied cluster's centre as NaN; ours keeps the previous centre and always
  returns exactly M groups (ops/kmeans.py).
"""

from __future__ import annotations

import torch

from ...calib.stats import LayerStatistics, statistic
from ...ops.clustering import hierarchical_grouping
from ...ops.kmeans import standardised_kmeans_grouping
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

    def __init__(self, config: HCSMoEConfig):
        super().__init__(config)
        self.propagation = config.propagation  # read by the pipeline (Method.propagation)

    def group(self, features: torch.Tensor, m: int, position: int) -> torch.Tensor:
        """The expert map `[N]` of this layer's M groups."""
        cfg = self.config
        if cfg.cluster == "kmeans":
            return standardised_kmeans_grouping(features, m, seed=cfg.kmeans_seed + position)
        return hierarchical_grouping(features, m, linkage=cfg.linkage, metric=cfg.metric)

    def merge(self, ctx: LayerContext, m: int):
        expert_map = self.group(ctx.stats["expert_output_mean"], m, ctx.position)
        if self.config.merge == "frequency":
            weights = frequency_weights(ctx.stats["frequency"], expert_map)
        else:
            weights = uniform_weights(expert_map)
        merged = average_experts(expert_tensors(ctx.view), expert_map, weights)
        return expert_map, merged, {"merge_weights": [round(float(w), 6) for w in weights],
                                    "cluster_sizes": torch.bincount(expert_map).tolist()}
