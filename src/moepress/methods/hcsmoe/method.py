"""HC-SMoE (Chen et al., ICML 2025, arXiv 2410.08589 §3): output-based clustering + frequency-weighted merge.

Per layer, as the authors' code does it by default (github.com/wazenmai/HC-SMoE, snapshot bd77eba:
`hcsmoe/merging-mixtral.py`, `hcsmoe/merging/grouping_mixtral.py`, `hcsmoe/merging/clustering.py`,
`scripts/mixtral/run.sh`, read for this implementation; no code copied):

1. Statistics of the *unmerged* model (`propagation="original"`): their `run_hcsmoe` first counts
   usages over the calibration set with the original model (`compute_all_usages`), then gathers the
   MoE inputs of every layer in one more forward pass of the original model
   (`group_experts_by_clustering_output`), and only then merges all layers
   (`merge_by_groups_with_usage_weighted`). moepress's pipeline therefore computes each MoE layer's
   output before compressing it and propagates that (`Method.propagation`);
   `propagation="compressed"` (inputs through the already-merged layers) is kept as an option.
2. Features: every expert applied to ALL calibration tokens of the layer (not only those routed to
   it), no routing weight, averaged over tokens -> one H-dim feature per expert
   (`experts[i](layer_input).mean(dim=0)`); no router logits, no normalisation.
3. Clustering into M groups (same M in every layer), `cluster=`:
   - `"kmeans"` (default): what their code runs by default. `run_hcsmoe(cluster="kmeans")` is the
     function default and `scripts/*/run.sh` pass `--cluster="hirarchical"`, which
     `group_experts_by_clustering` does not recognise (it tests `== "hierarchical"`), so it falls
     through to the K-means branch: k-means++ seeding, column-standardised Euclidean distances,
     mean centres (ops/kmeans.py). `--linkage` is then unused. One draw per layer: the result
     depends on the seed (`kmeans_seed`), as theirs depends on `torch.manual_seed(0)` and the RNG
     stream; ours cannot reproduce their draws.
   - `"hierarchical"`: the paper's description: agglomerative clustering, average linkage on the
     Euclidean distance between features (their `hierarchical_clustering`/`compute_distance`:
     plain Euclidean pairwise distances, merge the pair of clusters with the smallest mean
     pairwise distance until M remain = UPGMA = scipy `average`; no cluster-size limit — their
     `group_limit` only applies to the frequency-dominant grouping). `metric="cosine"` and the
     other linkages are options.
4. Merge: each group's W_G, W_U, W_D averaged with weights `f_j / sum_{k in C} f_k`, f_j = how
   often expert j is in the top-k of the calibration tokens (their `compute_all_usages`:
   `topk(router_logits, 2)` counts; `_merge_mlp_experts_by_usage_frequency_weighting`); plain
   weight averaging, no ZipIt/permutation alignment (`--merge=freq`, `--dominant=no`).
5. Router: unchanged N-way router and top-k; every member of a group points at the merged expert
   (theirs binds each member's module slot to the merged expert, so a token whose top-k holds two
   members gets the merged expert once with the two routing weights summed — the same function as
   our `RemappedMoeBlock`).

Remaining differences from the authors' run, and why:
- K-means draws: our generator is seeded per layer (`kmeans_seed + position`); theirs is one global
  torch stream (CPU for the first centre, the features' device for the rest). Same distribution of
  results, not the same draws.
- An emptied K-means cluster: theirs turns its centre into NaN, which makes every distance NaN
  through `_standardize`'s global minimum, and the run then stops with an error at the
  centre-expert step; ours keeps the previous centre and always returns M groups (ops/kmeans.py),
  so it only differs on runs theirs cannot finish.
- Frequencies use the model's own top-k; theirs hard-code `topk(router_logits, 2)` in both
  `grouping_mixtral.py` and `grouping_qwen.py` (the same for top-2 Mixtral; for top-4
  Qwen1.5-MoE theirs counts only each token's first two experts).
  Features are averaged in float64; theirs average bf16 outputs in float32 clustering.
- A group none of whose members was ever routed on the calibration set: theirs divides by
  `0 + FP32_EPS` and gets an all-zero expert; ours averages its members uniformly.
- A resumed streamed run (`offload`) cannot re-run the source weights of layers finished before the
  interruption; their states then come from the compressed layers (recorded per layer).
"""

from __future__ import annotations

import dataclasses

import torch

from ...calib.stats import LayerStatistics, statistic
from ...ops.clustering import hierarchical_grouping
from ...ops.kmeans import standardised_kmeans_grouping
from ...ops.merging import frequency_weights, uniform_weights
from ..base import LayerContext, Requirements
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
    summary = "HC-SMoE: clustering of expert outputs (K-means as its code runs, or hierarchical), freq-weighted merge"
    config_class = HCSMoEConfig
    needs = ("frequency", "expert_output_mean")

    def requirements(self) -> Requirements:
        return dataclasses.replace(super().requirements(), propagation=self.config.propagation)

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
