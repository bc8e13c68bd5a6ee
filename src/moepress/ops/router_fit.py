"""Fitting an M-row router that approximates the summed N-way routing (stock export of merged layers).

A merged layer's exact routing keeps the N-way router and sums the weights of a cluster's members
(MergeMoE §3, matrix A). A stock checkpoint needs an M-row router instead; this is an approximation
(docs/algorithms.md#router-fitting), fitted by least squares on the calibration inputs:

- softmax routers (Mixtral, Qwen, OLMoE, DeepSeek-V2, PhiMoE, gpt-oss): target logits are the log
  of the cluster-summed softmax probabilities, `t_i(x) = log Σ_{j∈C_i} softmax(z(x))_j`, centred per
  token (softmax is shift-invariant, so only differences between clusters matter). With singleton
  clusters the fit reproduces the original router up to a per-token shift, i.e. exactly.
- sigmoid routers (DeepSeek-V3): target `t_i(x) = logit(clip(Σ_{j∈C_i} σ(z_j(x)), ε, 1-ε))`, i.e. the
  merged expert's score approximates the (capped) sum of its members' scores; the selection-only
  `e_score_correction_bias` becomes the mean of the members'.
"""

from __future__ import annotations

import torch


def summed_softmax_target(scores: torch.Tensor, expert_map: torch.Tensor) -> torch.Tensor:
    """`[T, M]` centred log of the cluster-summed probabilities (`scores [T, N]` = softmax over N)."""
    m = int(expert_map.max()) + 1
    summed = torch.zeros(scores.shape[0], m, dtype=torch.float64, device=scores.device).index_add_(
        1, expert_map.to(scores.device), scores.double())
    target = summed.clamp_min(1e-30).log()
    return target - target.mean(dim=1, keepdim=True)


def summed_sigmoid_target(scores: torch.Tensor, expert_map: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """`[T, M]` logit of the cluster-summed sigmoid scores, clipped to (eps, 1 - eps)."""
    m = int(expert_map.max()) + 1
    summed = torch.zeros(scores.shape[0], m, dtype=torch.float64, device=scores.device).index_add_(
        1, expert_map.to(scores.device), scores.double())
    return torch.logit(summed.clamp(eps, 1 - eps))


def with_intercept(x: torch.Tensor) -> torch.Tensor:
    """Append a column of ones to `x [T, H]` so a least-squares fit also yields a bias."""
    return torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64, device=x.device)], dim=1)
