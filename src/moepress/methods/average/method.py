"""Uniform averaging baseline ("Average" rows of MergeMoE Tables 1–3).

Clustering is MergeMoE's (top-M experts by usage frequency are centres; the others join the most
similar centre by flattened [W_U; W_G]) so that the comparison with `mergemoe` isolates the merge
itself; every tensor of a cluster is then averaged with equal weights 1/|C|.
"""

from __future__ import annotations

from ...ops.clustering import centre_grouping
from ...ops.merging import uniform_weights
from ..base import LayerContext
from ..merging_common import MergingMethod, average_experts, expert_tensors, weight_similarity
from .config import AverageConfig


class AverageMerging(MergingMethod):
    name = "average"
    summary = "merge experts by uniform averaging within frequency-centred clusters (baseline)"
    config_class = AverageConfig
    needs = ("frequency",)

    def merge(self, ctx: LayerContext, m: int):
        tensors = expert_tensors(ctx.view)
        similarity = weight_similarity(tensors, self.config.similarity)
        expert_map = centre_grouping(ctx.stats["frequency"], similarity, m)
        return expert_map, average_experts(tensors, expert_map, uniform_weights(expert_map)), {}
