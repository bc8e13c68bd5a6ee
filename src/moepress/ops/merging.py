"""Parameter merging of experts within clusters (M-SMoE / HC-SMoE / MergeMoE gate-up step)."""

from __future__ import annotations

import torch


def frequency_weights(frequency: torch.Tensor, expert_map: torch.Tensor) -> torch.Tensor:
    """Within-cluster weights `B [N]`: `B_j = f_j / Σ_{k ∈ C(j)} f_k` (MergeMoE Theorem 1, M-SMoE Eq. 3).

    A cluster none of whose members was ever routed gets uniform weights (no division by zero).
    The weights of each cluster sum to 1 (each column of MergeMoE's B matrix). `[N]` numbers: on
    the CPU whatever device the counts came from (they steer per-expert loops).
    """
    f = frequency.detach().double().flatten().cpu()
    expert_map = expert_map.cpu()
    m = int(expert_map.max()) + 1
    totals = torch.zeros(m, dtype=torch.float64).index_add_(0, expert_map, f)
    sizes = torch.zeros(m, dtype=torch.float64).index_add_(0, expert_map, torch.ones_like(f))
    uniform = 1.0 / sizes[expert_map]
    return torch.where(totals[expert_map] > 0, f / totals[expert_map].clamp_min(1e-300), uniform)


def uniform_weights(expert_map: torch.Tensor) -> torch.Tensor:
    """`B_j = 1 / |C(j)|`: plain averaging within each cluster."""
    return frequency_weights(torch.zeros(expert_map.numel()), expert_map)


def weighted_merge(weights: torch.Tensor, expert_map: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """`W_i^new = Σ_{j ∈ C_i} B_j W_j` for per-expert tensors `weights [N, ...]` -> `[M, ...]`.

    MergeMoE Eq. 4 with T2 = T3 = [B_1 I, …, B_N I] (the gate/up merge); M-SMoE's merge of all three
    projections. Accumulates in fp32 (fp64 for fp64 inputs) and returns the input dtype.
    """
    acc = torch.float64 if weights.dtype == torch.float64 else torch.float32
    m = int(expert_map.max()) + 1
    out = torch.zeros(m, *weights.shape[1:], dtype=acc, device=weights.device)
    for j, i in enumerate(expert_map.tolist()):  # one expert at a time: no [N, ...] temporary
        out[i].add_(weights[j].to(acc), alpha=float(coefficients[j]))
    return out.to(weights.dtype)
