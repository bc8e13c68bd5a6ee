"""Per-token routing weights as dense `[T, experts]` matrices (MergeMoE §3: `A · mask_topK(·)`)."""

from __future__ import annotations

import torch


def dense_routing(weights: torch.Tensor, index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """`G [T, N]` with `G[t, j]` = routing weight of expert j for token t (0 when j is not in its top-k).

    Args: weights, index `[T, k]` (the router's top-k); num_experts: N. Returns fp64.
    """
    out = torch.zeros(index.shape[0], num_experts, dtype=torch.float64, device=index.device)
    return out.scatter_add_(1, index, weights.double())


def cluster_routing(dense: torch.Tensor, expert_map: torch.Tensor) -> torch.Tensor:
    """`S = G Aᵀ [T, M]`: the routing weight merged expert i receives, summed over its members.

    MergeMoE §3: multiplying the routing vector by the 0/1 cluster matrix A sums the weights of the
    experts of one cluster; this is exactly what the remapped block runs (`moepress_remap`).
    """
    m = int(expert_map.max()) + 1
    out = torch.zeros(dense.shape[0], m, dtype=dense.dtype, device=dense.device)
    return out.index_add_(1, expert_map.to(dense.device), dense)
