"""Least-squares refit of a down projection from accumulated normal equations (MergeMoE Eq. 5–6)."""

from __future__ import annotations

import warnings

import torch


class RankDeficientWarning(UserWarning):
    """Fewer calibration tokens than unknowns per output row: the least-squares solve is underdetermined."""


class NormalEquations:
    """Streams the least-squares data of `min_W ‖W P − Y‖_F` over token batches (fp64, bounded memory).

    `P [f, t]`: merged-path intermediate activations; `Y [d, t]`: target outputs; tokens are rows in
    `add(p [t, f], y [t, d])`. While fewer than f tokens have been seen, the rows themselves are kept
    (t·f numbers, less than the f×f Gram); from the f-th token on, only `Y Pᵀ = yᵀ p [d, f]` and
    `P Pᵀ = pᵀ p [f, f]` are kept (the rows are folded in and dropped). `solve()` uses the dual form
    while rows are held — the same minimum-norm solution at O(t²f) instead of an f×f decomposition.
    """

    def __init__(self, in_features: int, out_features: int):
        self.in_features, self.out_features = in_features, out_features
        self.rows_p: list[torch.Tensor] | None = []
        self.rows_y: list[torch.Tensor] = []
        self._cross: torch.Tensor | None = None
        self._gram: torch.Tensor | None = None
        self.tokens = 0

    def add(self, p: torch.Tensor, y: torch.Tensor) -> None:
        p, y = p.detach().double().cpu(), y.detach().double().cpu()
        self.tokens += p.shape[0]
        if self.rows_p is not None:
            self.rows_p.append(p)
            self.rows_y.append(y)
            if self.tokens < self.in_features:
                return
            p, y = torch.cat(self.rows_p), torch.cat(self.rows_y)
            self.rows_p, self.rows_y = None, []
            self._cross = torch.zeros(self.out_features, self.in_features, dtype=torch.float64)
            self._gram = torch.zeros(self.in_features, self.in_features, dtype=torch.float64)
        self._cross += y.T @ p
        self._gram += p.T @ p

    def _rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.rows_p:
            return (torch.zeros(0, self.in_features, dtype=torch.float64),
                    torch.zeros(0, self.out_features, dtype=torch.float64))
        return torch.cat(self.rows_p), torch.cat(self.rows_y)

    @property
    def cross(self) -> torch.Tensor:
        """`Y Pᵀ [d, f]` (computed from the held rows if still in row mode)."""
        if self.rows_p is None:
            return self._cross
        p, y = self._rows()
        return y.T @ p

    @property
    def gram(self) -> torch.Tensor:
        """`P Pᵀ [f, f]`."""
        if self.rows_p is None:
            return self._gram
        p, _ = self._rows()
        return p.T @ p

    def solve(self, solver: str = "pinv", ridge: float = 0.0, prior: torch.Tensor | None = None) -> torch.Tensor:
        """`[d, f]` minimiser of ‖W P − Y‖ (see `solve_normal_equations`); dual form while rows are held.

        Dual (t < f): `W = Y (PᵀP)† Pᵀ`, the minimum-norm solution, equal to `(Y Pᵀ)(P Pᵀ)†`;
        ridge: `W = Y (PᵀP + λ' I)⁻¹ Pᵀ`, equal to the primal ridge with the same λ'.
        With a `prior` W0 (ridge only) the same holds for the residual `Y − W0 P`, shifted by W0.
        """
        if prior is not None and solver != "ridge":
            raise ValueError("a prior needs solver='ridge' (the pseudo-inverse ignores it)")
        if self.rows_p is None:
            return solve_normal_equations(self._cross, self._gram, solver, ridge, prior)
        p, y = self._rows()
        if solver == "ridge":
            lam = ridge * (p * p).sum() / self.in_features  # λ relative to mean diag(P Pᵀ), as in the primal
            k = p @ p.T + lam * torch.eye(p.shape[0], dtype=p.dtype)
            if prior is None:
                return torch.linalg.solve(k, y).T @ p
            w0 = prior.double().cpu()
            return w0 + torch.linalg.solve(k, y - p @ w0.T).T @ p
        dual = solve_normal_equations(y.T, p @ p.T, "pinv")  # [d, t] = Y (PᵀP)†
        return dual @ p


def solve_normal_equations(cross: torch.Tensor, gram: torch.Tensor, solver: str = "pinv",
                           ridge: float = 0.0, prior: torch.Tensor | None = None) -> torch.Tensor:
    """`W = (Y Pᵀ)(P Pᵀ)†` (pinv) or `W = (Y Pᵀ + λ' W0)(P Pᵀ + λ' I)⁻¹` (ridge): the minimiser of
    `‖W P − Y‖_F² + λ'‖W − W0‖_F²`, `λ' = ridge · mean diag(P Pᵀ)`, `W0` = `prior` or 0.

    MergeMoE Eq. 6: `T1 = Q P†`, `W_D^new = W'_D T1 = Y_tgt P†`; `Y P† = (Y Pᵀ)(P Pᵀ)†` exactly
    (pseudo-inverse identity), so the |C|f × f matrix T1 is never built. The ridge toward a prior
    is our addition (not in the paper): with W0 = a data-free down projection (the members'
    frequency average, or a kept expert's own), directions the calibration tokens never excite stay
    at W0 instead of being set to 0, which is what keeps the fit sane on text unlike the calibration.

    Args:
        cross: `[d, f]` = Y Pᵀ; gram: `[f, f]` = P Pᵀ (fp64 recommended); prior: `[d, f]` or None.
        solver: "pinv" (the paper's Moore–Penrose pseudo-inverse, via eigendecomposition of the
            symmetric Gram with the numpy/LAPACK default cutoff) or "ridge" (λ relative to the mean diagonal).
    Returns:
        `[d, f]` fp64.
    """
    if prior is not None and solver != "ridge":
        raise ValueError("a prior needs solver='ridge' (the pseudo-inverse ignores it)")
    gram = 0.5 * (gram + gram.T)
    if solver == "ridge":
        scale = gram.diagonal().mean().clamp_min(1e-300)
        eye = torch.eye(gram.shape[0], dtype=gram.dtype)
        if prior is not None:
            cross = cross + ridge * scale * prior.to(cross.dtype).to(cross.device)
        return torch.linalg.solve(gram + ridge * scale * eye, cross.T).T
    if solver != "pinv":
        raise ValueError(f"solver must be 'pinv' or 'ridge', got {solver!r}")
    evals, evecs = torch.linalg.eigh(gram)
    cutoff = evals.abs().max() * gram.shape[0] * torch.finfo(gram.dtype).eps
    inv = torch.where(evals > cutoff, 1.0 / evals.clamp_min(1e-300), torch.zeros_like(evals))
    return (cross @ evecs) * inv @ evecs.T


def warn_if_rank_deficient(tokens: int, unknowns: int, what: str) -> bool:
    """Warn when `tokens < unknowns` (P Pᵀ singular). Returns True if it warned."""
    if tokens < unknowns:
        warnings.warn(
            f"{what}: only {tokens} calibration tokens for an intermediate size of {unknowns}; the least-squares "
            f"down projection is rank-deficient (the MergeMoE paper sees collapse with too few samples). "
            f"Use at least {unknowns} tokens (more calibration samples / longer sequences, or tokens='all'), "
            f"or solver='ridge'.",
            RankDeficientWarning,
            stacklevel=3,
        )
        return True
    return False
