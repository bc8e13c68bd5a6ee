"""Fisher-weighted merge of a layer's experts into one shared base (D²-MoE §3.2, Eq. 4–5).

    W_b = Σ_i (F_i ⊙ f_i) ⊙ W_i  /  Σ_i (F_i ⊙ f_i)          (element-wise)

F_i is the empirical Fisher of expert i's weight (mean squared gradient of the next-token loss,
one value per weight element) and f_i the expert's usage frequency. The released D²-MoE code
multiplies the element-wise Fisher by the scalar frequency count exactly like this; `mean` and
`freq` are the paper's Table 5 ablations (plain average, M-SMoE-style frequency average).
"""

from __future__ import annotations

import torch


def fisher_merge(
    weights: torch.Tensor,
    fisher: torch.Tensor | None = None,
    frequency: torch.Tensor | None = None,
    eps: float = 1e-30,
) -> torch.Tensor:
    """Element-wise weighted average of expert weights.

    Args:
        weights: `[E, out, in]` expert weights (one projection of one layer).
        fisher: `[E, out, in]` element-wise importance (None = all ones).
        frequency: `[E]` usage counts (None = all ones).
        eps: where every expert's weight at an element is 0 (e.g. no expert ever routed and a
            zero Fisher), the plain mean is used for that element instead of 0/0.
    Returns:
        `[out, in]` base in float64.
    """
    w = weights.double()
    alpha = torch.ones_like(w) if fisher is None else fisher.double().clone()
    if frequency is not None:
        alpha = alpha * frequency.double().reshape(-1, *([1] * (w.dim() - 1)))
    total = alpha.sum(0)
    merged = (alpha * w).sum(0) / total.clamp_min(eps)
    return torch.where(total > eps, merged, w.mean(0))


def merge_weights_for(base: str, fisher: torch.Tensor | None, frequency: torch.Tensor) -> tuple:
    """The `(fisher, frequency)` pair to pass to `fisher_merge` for base option `fisher|mean|freq`."""
    if base == "mean":
        return None, None
    if base == "freq":
        return None, frequency
    if base == "fisher":
        if fisher is None:
            raise ValueError("base='fisher' needs the Fisher information; run Method.prepare first")
        return fisher, frequency
    raise ValueError(f"unknown base {base!r}; choose fisher, mean or freq")
