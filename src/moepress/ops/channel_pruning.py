"""Structured pruning of the shared base's intermediate channels (D²-MoE §3.4, Eq. 9).

Channel j of the base's intermediate layer (row j of the base gate/up, column j of the base
down projection) is scored Wanda-sp style

    C_j = ‖W_down_base[:, j]‖₂ · ‖X_j‖₂

with `X_j` the activations of channel j. Semi-dynamic: half of the pruned channels are chosen
once from calibration statistics and removed from storage (static); the other half is chosen per
batch at run time from the current batch's activations (dynamic; done in the delta block).
"""

from __future__ import annotations

import torch


def channel_scores(down_base: torch.Tensor, activation_sq_sum: torch.Tensor) -> torch.Tensor:
    """Eq. 9 scores `[I]` from `down_base [H, I]` and `Σ_t x_{t,j}²` `[I]` of the channels."""
    return down_base.double().norm(dim=0) * activation_sq_sum.double().clamp_min(0).sqrt()


def rounded_channel_count(width: int, fraction: float, multiple: int = 64) -> tuple[int, int]:
    """Channels to prune: `width·fraction` rounded to the nearest multiple of `multiple`.

    Tensor-core friendly widths (the released code rounds to 64). The rounding applies where the
    width allows it: `width` is a multiple of `multiple` and the rounded count is not zero (so
    rounding never silently turns a requested pruning into none); else the nearest multiple of 8
    is tried the same way (keeps the kept width 16-byte aligned for grouped kernels); else the
    exact count (multiple 1). Returns `(count, multiple_used)`; callers record both.
    """
    raw = width * fraction
    for m in (multiple, 8):
        if m > 1 and width % m == 0 and round(raw / m) >= 1:
            return min(int(round(raw / m)) * m, width - m), m
    return min(int(round(raw)), width - 1), 1


def static_channel_keep(scores: torch.Tensor, prune: int) -> torch.Tensor:
    """Sorted indices of the channels kept after removing the `prune` lowest-scoring ones."""
    if prune <= 0:
        return torch.arange(scores.numel())
    order = torch.argsort(scores, descending=True, stable=True)
    return torch.sort(order[: scores.numel() - prune]).values
