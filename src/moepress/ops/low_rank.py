"""Low-rank expert budgets for MoE-I² (Yang et al. 2024, arXiv 2411.01016; docs/algorithms.md#moe_i2).

One SwiGLU expert has three projections, gate and up `[I, H]` and down `[H, I]`. Stored at rank r
each as `U [out, r] · V [r, in]`, it costs `3 r (H + I)` parameters instead of `3 H I`.

The overall `ratio` (fraction of routed-expert parameters removed) is split between the two stages:
stage 1 removes the fraction `p = expert_share · ratio` of the experts, stage 2 keeps the fraction

    q = (1 − ratio) / (1 − p')            (p' = the fraction stage 1 actually removed)

of the surviving experts' parameters, so `(1 − p')·q = 1 − ratio` over the whole model.
"""

from __future__ import annotations

import math


def low_rank_parameters(hidden: int, intermediate: int, rank: int) -> int:
    """Parameters of one expert whose gate, up and down are each stored at rank `rank`: `3 r (H + I)`."""
    return 3 * int(rank) * (int(hidden) + int(intermediate))


def stage_split(ratio: float, expert_share: float) -> float:
    """Fraction of experts stage 1 should remove: `p = expert_share · ratio`."""
    if not 0.0 <= ratio < 1.0 or not 0.0 <= expert_share <= 1.0:
        raise ValueError(f"need 0 <= ratio < 1 and 0 <= expert_share <= 1, got {ratio}, {expert_share}")
    return expert_share * ratio


def kept_parameter_fraction(ratio: float, removed_expert_fraction: float) -> float:
    """`q = (1 − ratio) / (1 − p')`: the share of the surviving experts' parameters stage 2 keeps."""
    if removed_expert_fraction >= 1.0:
        raise ValueError("stage 1 cannot remove every expert")
    return (1.0 - ratio) / (1.0 - removed_expert_fraction)


def layer_rank_budget(per_expert: int, rank_cost: int, experts: int, keep_fraction: float,
                      dense_per_expert: int = 0) -> int:
    """Sum of per-expert ranks `R` a layer of `experts` experts may spend so that its stored routed
    parameters `R · rank_cost + experts · dense_per_expert` stay within `keep_fraction` of the
    original `experts · per_expert`. `per_expert` is the expert's parameter count (its owner is the
    family's expert format, `MoELayerView.parameters_per_expert`), `rank_cost` what one rank of the
    factors stores (`low_rank_parameters(H, I, 1)`), `dense_per_expert` what stays dense (biases)."""
    spend = keep_fraction * experts * per_expert - experts * dense_per_expert
    return max(0, math.floor(spend / rank_cost + 1e-9))


def proportional_ranks(weights: list[float], total: int, cap: int, floor: int = 1) -> list[int]:
    """Integer ranks `r_j ∈ [floor, cap]` with `Σ r_j = min(total, n·cap)`, the part above `floor`
    shared in proportion to `weights` (water-filling: a rank that reaches `cap` stops growing and
    its surplus is shared among the others; integer remainders go to the largest fractional parts,
    ties to the lower index).

    Args:
        weights: one non-negative importance per expert (all zero = equal shares).
        total: rank budget R. cap: largest useful rank, min(H, I). floor: smallest rank given.
    """
    n = len(weights)
    if n == 0:
        return []
    total = min(int(total), n * cap)
    floor = min(floor, total // n, cap)
    alloc = [float(floor)] * n
    remaining = float(total - n * floor)
    growing = list(range(n))
    while remaining > 1e-9 and growing:
        w = [max(float(weights[j]), 0.0) for j in growing]
        wsum = sum(w)
        share = [remaining * (wj / wsum if wsum > 0 else 1.0 / len(growing)) for wj in w]
        capped = [j for j, s in zip(growing, share) if alloc[j] + s >= cap]
        if not capped:
            for j, s in zip(growing, share):
                alloc[j] += s
            break
        for j in capped:
            remaining -= cap - alloc[j]
            alloc[j] = float(cap)
        growing = [j for j in growing if j not in capped]
    ranks = [min(cap, math.floor(a + 1e-9)) for a in alloc]
    leftover = total - sum(ranks)
    order = sorted(range(n), key=lambda j: (-(alloc[j] - ranks[j]), j))
    for j in order:
        if leftover <= 0:
            break
        if ranks[j] < cap:
            ranks[j] += 1
            leftover -= 1
    return ranks
