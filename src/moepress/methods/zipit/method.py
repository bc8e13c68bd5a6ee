"""ZipIt! for expert merging (Stoica et al. 2023 arXiv 2305.03053; as used by MC-SMoE/MergeMoE baselines).

Adaptation (our choice, documented): clusters as M-SMoE (top-M-frequency dominant experts, others by
router-logit similarity). Inside a cluster, members are zipped one at a time in descending frequency:
the running merged expert and the next member are zipped by `ops.zipit` — Pearson correlation of
their 2I intermediate activations over ALL calibration tokens (streamed first and second moments,
fp64), greedy disjoint pairing by correlation within and across the two experts, merged neuron =
frequency-weighted average of gate/up rows, down columns summed with frequency weights. Cost is
O((2I)²) memory per zip step, fine for the reference models, heavy at Mixtral-8x7B size.
"""

from __future__ import annotations

import torch

from ...ops.clustering import centre_grouping, groups_of
from ...ops.merging import frequency_weights
from ...ops.zipit import activation_correlation, greedy_pairs, zip_two_experts
from ..base import LayerContext
from ..merging_common import MergingMethod, expert_tensors
from .config import ZipItConfig


def expert_of(tensors: dict, j: int) -> dict:
    return {k: None if v is None else v[j].double() for k, v in tensors.items()}


def correlation_of(view, batches, first: dict, second: dict, reduce=lambda sums: sums) -> torch.Tensor:
    """Correlation `[2I, 2I]` of the concatenated intermediates of two experts over all tokens.

    `reduce` sums the moments over data-parallel ranks (`LayerStatistics.reduce`)."""
    size = 2 * first["gate"].shape[0]
    device = first["gate"].device
    s1 = torch.zeros(size, dtype=torch.float64, device=device)
    s2 = torch.zeros(size, size, dtype=torch.float64, device=device)
    count = 0
    for x in batches:
        x = x.double()
        h = torch.cat([view.intermediate_of(first, x), view.intermediate_of(second, x)], dim=1)
        s1 += h.sum(0)
        s2 += h.T @ h
        count += x.shape[0]
    s1, s2, count = reduce([s1, s2, count])
    return activation_correlation(s1 / count, s2 / count)


class ZipItMerging(MergingMethod):
    name = "zipit"
    summary = "ZipIt!: zip correlated intermediate neurons of experts within clusters (baseline)"
    config_class = ZipItConfig
    needs = ("frequency", "router_logit_similarity")

    def merge(self, ctx: LayerContext, m: int):
        view, frequency = ctx.view, ctx.stats["frequency"]
        tensors = expert_tensors(view)
        expert_map = centre_grouping(frequency, ctx.stats["router_logit_similarity"], m)
        weights = frequency_weights(frequency, expert_map)
        merged = {k: [] for k in tensors}
        for members in groups_of(expert_map):
            members = sorted(members, key=lambda j: (-float(frequency[j]), j))
            running, w_running = expert_of(tensors, members[0]), float(weights[members[0]])
            for j in members[1:]:
                other, w_other = expert_of(tensors, j), float(weights[j])
                pairs = greedy_pairs(correlation_of(view, ctx.stats.batches, running, other, ctx.stats.reduce))
                running = zip_two_experts(running, other, w_running, w_other, pairs)
                w_running += w_other
            for k in tensors:
                merged[k].append(running.get(k))
        out = {k: None if tensors[k] is None else torch.stack(v).to(tensors[k].dtype) for k, v in merged.items()}
        return expert_map, out, {}
