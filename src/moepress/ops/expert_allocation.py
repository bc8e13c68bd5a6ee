"""Non-uniform expert pruning counts across layers (MoE-I² stage 1, "layer importance"; docs/algorithms.md#moe_i2).

Each layer l has a removal cost per expert `c_lj` (how much the layer output changes when expert j
alone is removed). Pruning `k` experts of layer l is charged `C_l(k)` = the sum of its k smallest
costs, so a layer whose experts all matter (an important layer) gets few prunings and a layer
with dispensable experts gets many. The counts minimise `Σ_l C_l(k_l)` subject to
`Σ_l k_l = total` and `k_l` in the layer's allowed set (routing constraints), by dynamic
programming over layers (exact for this separable objective).
"""

from __future__ import annotations

import torch


def pruning_cost_curve(costs: torch.Tensor) -> torch.Tensor:
    """`C(k)` for k = 0..N: cumulative sum of the ascending per-expert removal costs `[N]`."""
    return torch.cat([torch.zeros(1, dtype=torch.float64), torch.sort(costs.double().flatten()).values.cumsum(0)])


def allocate_pruned_experts(costs: list[torch.Tensor], allowed: list[list[int]], total: int) -> list[int]:
    """How many experts to prune in each layer.

    Args:
        costs: per layer, `[N_l]` removal costs of its experts (larger = more important).
        allowed: per layer, the prune counts its routing allows (e.g. keep >= top-k).
        total: experts to prune over all layers.
    Returns:
        `k_l` per layer minimising `Σ C_l(k_l)` with `Σ k_l` equal to the reachable total closest to
        `total` (the smaller one on a tie).
    Raises:
        ValueError: a layer allows no count at all.
    """
    if any(not a for a in allowed):
        raise ValueError("every layer needs at least one allowed prune count")
    curves = []
    for layer_costs, options in zip(costs, allowed):
        curve = pruning_cost_curve(layer_costs)
        curves.append({k: float(curve[k]) for k in options})
    return allocate_min_sum(curves, total)


def allocate_min_sum(curves: list[dict[int, float]], total: int) -> list[int]:
    """One count per layer, `m_i` a key of `curves[i]`, minimising `Σ_i curves[i][m_i]` with `Σ_i m_i`
    the reachable total closest to `total` (the smaller one on a tie). Exact dynamic programming over
    layers (the objective is separable; no convexity needed). Ties between counts of one layer keep
    the smaller count. Raises ValueError when no combination is reachable."""
    upper = sum(max(c) for c in curves)
    inf = float("inf")
    best = torch.full((upper + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    picks = []
    for curve in curves:
        new = torch.full_like(best, inf)
        pick = torch.full((upper + 1,), -1, dtype=torch.long)
        for m in sorted(curve):
            shifted = torch.full_like(best, inf)
            shifted[m:] = best[: upper + 1 - m] + float(curve[m])
            better = shifted < new
            new = torch.where(better, shifted, new)
            pick = torch.where(better, torch.full_like(pick, m), pick)
        best = new
        picks.append(pick)
    reachable = [t for t in range(upper + 1) if best[t] < inf]
    if not reachable:
        raise ValueError("no combination of the allowed counts is reachable")
    target = min(reachable, key=lambda t: (abs(t - total), t))
    counts = []
    for pick in reversed(picks):
        m = int(pick[target])
        counts.append(m)
        target -= m
    return counts[::-1]


def uniform_pruned_experts(num_experts: list[int], allowed: list[list[int]], fraction: float) -> list[int]:
    """Per layer the allowed prune count closest to `fraction · N_l` (the smaller one on a tie)."""
    return [min(options, key=lambda k: (abs(k - fraction * n), k)) for n, options in zip(num_experts, allowed)]
