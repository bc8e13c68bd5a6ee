"""MoE-Pruner (Xie et al. 2024, arXiv 2410.12013): router-weighted unstructured weight pruning.

For one projection `W [out, in]` of routed expert e, with `X_e` the calibration inputs of that
projection on the tokens routed to e and `g_t` each token's routing weight for e, the score of
weight (i, j) is

    S_ij = |W_ij| · ‖g ⊙ X_e[:, j]‖₂ = |W_ij| · sqrt(Σ_{t routed to e} (g_t x_tj)²)

i.e. Wanda's `|W| · ‖X_j‖` with each input row scaled by the router weight the token gives the
expert ("magnitude × input activation × router weight"). Weights are compared per output row
(Wanda's comparison group): each row loses the same number of its lowest-scoring weights. The
2:4 (generally N:M) semi-structured variant keeps the N highest scores in every group of M
consecutive inputs of a row.
"""

from __future__ import annotations

import torch


def moe_pruner_scores(weight: torch.Tensor, gated_input_sq: torch.Tensor) -> torch.Tensor:
    """`S = |W| · sqrt(Σ_t (g_t x_t)²)` broadcast over rows.

    Args:
        weight: `[out, in]`.
        gated_input_sq: `[in]`, `Σ_t g_t² x_tj²` over the tokens routed to the expert.
    Returns: `[out, in]` float64 scores.
    """
    return weight.detach().double().abs() * gated_input_sq.double().clamp_min(0).sqrt()[None, :]


def unstructured_row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean keep-mask `[out, in]`: in every row the `int(in · sparsity)` lowest scores are dropped.

    Ties are broken by column index (stable sort), so the mask is deterministic.
    """
    out, width = scores.shape
    drop = int(width * float(sparsity))
    keep = torch.ones(out, width, dtype=torch.bool)
    if drop <= 0:
        return keep
    order = torch.sort(scores.cpu(), dim=1, stable=True).indices[:, :drop]
    return keep.scatter_(1, order, False)


def n_m_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean keep-mask `[out, in]` keeping the `n` highest scores of every `m` consecutive inputs.

    `in` must be a multiple of `m`. Ties keep the lower index.
    """
    out, width = scores.shape
    if width % m:
        raise ValueError(f"{n}:{m} sparsity needs the input width ({width}) to be a multiple of {m}")
    groups = scores.cpu().reshape(out, width // m, m)
    # stable descending order: negate, sort ascending with stable ties
    top = torch.sort(-groups, dim=-1, stable=True).indices[..., :n]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return keep.reshape(out, width)


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """`"unstructured"` -> None; `"N:M"` (N < M, both >= 1) -> (N, M); anything else raises ValueError."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(p) for p in pattern.split(":"))
    except ValueError:
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' such as '2:4', got {pattern!r}") from None
    if not 1 <= n < m:
        raise ValueError(f"pattern N:M needs 1 <= N < M (N weights kept of every M), got {pattern!r}")
    return n, m
