"""M-SMoE (Li et al., ICLR 2024, arXiv 2310.01334 §3.1–3.2), the merging stage of MC-SMoE.

1. Dominant experts: the M most frequently routed experts on the calibration tokens.
2. Grouping: each other expert joins the dominant expert with the most similar router logits
   (cosine over calibration tokens; the paper's default similarity).
3. Alignment: each member's intermediate neurons are permuted onto its dominant expert's by weight
   matching (Hungarian, scipy `linear_sum_assignment`; gate/up rows and down columns together —
   output-preserving).
4. Merge: usage-frequency-weighted average of all projections.

Deviations: the number of groups is the same in every layer (`ratio` / `experts`) instead of the
paper's adaptive global allocation — MergeMoE's protocol, which found uniform allocation better; the
later "compress" stage (low rank + sparsity) and KD fine-tuning of MC-SMoE are not part of M-SMoE.
"""

from __future__ import annotations

import torch

from ...ops.alignment import match_neurons, neuron_features, permute_expert
from ...ops.clustering import centre_grouping, groups_of
from ...ops.merging import frequency_weights
from ..base import LayerContext
from ..merging_common import MergingMethod, average_experts, expert_tensors, weight_similarity
from .config import MSMoEConfig


def align_groups(tensors: dict, groups: list[list[int]], frequency: torch.Tensor) -> dict:
    """Copies of the expert tensors with every group member's neurons permuted onto its group's most
    frequent expert (the dominant one). Expert functions are unchanged."""
    out = {k: None if v is None else v.clone() for k, v in tensors.items()}
    has_bias = tensors["gate_bias"] is not None
    for members in groups:
        ref = max(members, key=lambda j: (float(frequency[j]), -j))
        ref_features = neuron_features(tensors["gate"][ref], tensors["up"][ref], tensors["down"][ref])
        for j in members:
            if j == ref:
                continue
            perm = match_neurons(neuron_features(tensors["gate"][j], tensors["up"][j], tensors["down"][j]), ref_features)
            g, u, d, gb, ub = permute_expert(
                perm, tensors["gate"][j], tensors["up"][j], tensors["down"][j],
                tensors["gate_bias"][j] if has_bias else None, tensors["up_bias"][j] if has_bias else None)
            out["gate"][j], out["up"][j], out["down"][j] = g, u, d
            if has_bias:
                out["gate_bias"][j], out["up_bias"][j] = gb, ub
    return out


class MSMoE(MergingMethod):
    name = "msmoe"
    summary = "M-SMoE: frequency-dominant experts, router-logit grouping, neuron alignment, weighted average"
    config_class = MSMoEConfig
    needs = ("frequency", "router_logit_similarity")

    def merge(self, ctx: LayerContext, m: int):
        frequency = ctx.stats["frequency"]
        tensors = expert_tensors(ctx.view)
        if self.config.similarity == "router-logits":
            similarity = ctx.stats["router_logit_similarity"]
        else:
            similarity = weight_similarity(tensors, "cosine")
        expert_map = centre_grouping(frequency, similarity, m)
        if self.config.align:
            tensors = align_groups(tensors, groups_of(expert_map), frequency)
        weights = frequency_weights(frequency, expert_map)
        merged = average_experts(tensors, expert_map, weights)
        return expert_map, merged, {"merge_weights": [round(float(w), 6) for w in weights]}
