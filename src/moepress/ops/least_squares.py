"""Least-squares refit of a down projection from accumulated normal equations (MergeMoE Eq. 5–6).

Speed: the normal equations are solved by Cholesky (`n³/3` flops, BLAS-3) whenever the Gram is
numerically positive definite well above the pseudo-inverse cutoff: then the paper's pseudo-inverse
is the plain inverse. The pseudo-inverse through an eigendecomposition (≈4n³ flops, its tridiagonal
reduction memory-bound; 16× the time of Cholesky + solve at n = 3584 in benchmarks/layer_speed.py)
is the fallback, taken and recorded when the factorisation fails or the Gram is too close to
singular. Everything runs on the device of its inputs.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

# The Cholesky route is taken only when the smallest eigenvalue clears the pseudo-inverse's own
# cutoff by this factor: the eigenvalue estimate below is an upper bound, the margin absorbs it.
CHOLESKY_MARGIN = 10.0


class RankDeficientWarning(UserWarning):
    """Fewer calibration tokens than unknowns per output row: the least-squares solve is underdetermined."""


class LeastSquaresSolution(NamedTuple):
    """`weight [d, f]` (float64) and how it was computed: "cholesky" or "pinv-fallback"."""

    weight: torch.Tensor
    method: str


class NormalEquations:
    """Streams the least-squares data of `min_W ‖W P − Y‖_F` over token batches (fp64, bounded memory).

    `P [f, t]`: merged-path intermediate activations; `Y [d, t]`: target outputs; tokens are rows in
    `add(p [t, f], y [t, d])`. While fewer than f tokens have been seen, the rows themselves are kept
    (t·f numbers, less than the f×f Gram); from the f-th token on, only `Y Pᵀ = yᵀ p [d, f]` and
    `P Pᵀ = pᵀ p [f, f]` are kept (the rows are folded in and dropped). `solve()` uses the dual form
    while rows are held — the same minimum-norm solution at O(t²f) instead of an f×f decomposition.
    Accumulators live on the device of the first batch; `solved_by` records the last solve's route.
    """

    def __init__(self, in_features: int, out_features: int):
        self.in_features, self.out_features = in_features, out_features
        self.rows_p: list[torch.Tensor] | None = []
        self.rows_y: list[torch.Tensor] = []
        self._cross: torch.Tensor | None = None
        self._gram: torch.Tensor | None = None
        self.tokens = 0
        self._device = torch.device("cpu")  # of the rows seen (empty equations live on the CPU)
        self.solved_by: str | None = None

    def add(self, p: torch.Tensor, y: torch.Tensor) -> None:
        # float64 products: the pseudo-inverse cutoff (n·eps·λmax) is meant at double precision, and a
        # float32 Gram of 14336 channels would already lose the directions below ~1e-6·λmax.
        p, y = p.detach().to(torch.float64), y.detach().to(torch.float64).to(p.device)
        self._device = p.device
        self.tokens += p.shape[0]
        if self.rows_p is not None:
            self.rows_p.append(p)
            self.rows_y.append(y)
            if self.tokens < self.in_features:
                return
            p, y = torch.cat(self.rows_p), torch.cat(self.rows_y)
            self.rows_p, self.rows_y = None, []
            self._cross = p.new_zeros(self.out_features, self.in_features)
            self._gram = p.new_zeros(self.in_features, self.in_features)
        self._cross.addmm_(y.T, p)  # in place: no f×f temporary per batch
        self._gram.addmm_(p.T, p)

    def summed(self, reduce) -> "NormalEquations":
        """These equations with `cross`, `gram` and `tokens` passed through `reduce` (a sum over
        data-parallel ranks: `LayerStatistics.reduce` calls this only in a data-parallel run).

        The result is always in Gram form: each rank's rows would need a gather, and the primal
        `(Y Pᵀ)(P Pᵀ)†` of the summed Gram is the same minimum-norm solution the dual form gives
        (see `solve`), so below f tokens the data-parallel solve equals the single-process one up
        to rounding (not bit for bit)."""
        cross, gram, tokens = reduce([self.cross.clone(), self.gram.clone(), self.tokens])
        out = NormalEquations(self.in_features, self.out_features)
        out.rows_p, out._cross, out._gram, out.tokens = None, cross, gram, tokens
        return out

    def _rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.rows_p:
            return (torch.zeros(0, self.in_features, dtype=torch.float64, device=self._device),
                    torch.zeros(0, self.out_features, dtype=torch.float64, device=self._device))
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
        """`[d, f]` minimiser of ‖W P − Y‖ (see `fit_normal_equations`); dual form while rows are held.

        Dual (t < f): `W = Y (PᵀP)† Pᵀ`, the minimum-norm solution, equal to `(Y Pᵀ)(P Pᵀ)†`;
        ridge: `W = Y (PᵀP + λ' I)⁻¹ Pᵀ`, equal to the primal ridge with the same λ'.
        With a `prior` W0 (ridge only) the same holds for the residual `Y − W0 P`, shifted by W0.
        """
        if prior is not None and solver != "ridge":
            raise ValueError("a prior needs solver='ridge' (the pseudo-inverse ignores it)")
        if self.rows_p is None:
            solution = fit_normal_equations(self._cross, self._gram, solver, ridge, prior)
            self.solved_by = solution.method
            return solution.weight
        p, y = self._rows()
        w0 = None if prior is None else prior.to(dtype=p.dtype, device=p.device)
        if w0 is not None:
            y = y - p @ w0.T
        if solver == "ridge":
            lam = ridge * (p * p).sum() / self.in_features  # λ relative to mean diag(P Pᵀ), as in the primal
            dual = _symmetric_solve(y.T, p @ p.T + lam * torch.eye(p.shape[0], dtype=p.dtype, device=p.device),
                                    pseudo_inverse=False)
        else:
            dual = fit_normal_equations(y.T, p @ p.T, "pinv")  # [d, t] = Y (PᵀP)†
        self.solved_by = dual.method
        weight = dual.weight @ p
        return weight if w0 is None else w0 + weight


def fit_normal_equations(cross: torch.Tensor, gram: torch.Tensor, solver: str = "pinv",
                         ridge: float = 0.0, prior: torch.Tensor | None = None) -> LeastSquaresSolution:
    """`W = (Y Pᵀ)(P Pᵀ)†` (pinv) or `W = (Y Pᵀ + λ' W0)(P Pᵀ + λ' I)⁻¹` (ridge): the minimiser of
    `‖W P − Y‖_F² + λ'‖W − W0‖_F²`, `λ' = ridge · mean diag(P Pᵀ)`, `W0` = `prior` or 0.

    The ridge toward a prior is our addition (not in the paper): with W0 = a data-free down
    projection (the members' frequency average, or a kept expert's own), directions the calibration
    tokens never excite stay at W0 instead of being set to 0.

    MergeMoE Eq. 6: `T1 = Q P†`, `W_D^new = W'_D T1 = Y_tgt P†`; `Y P† = (Y Pᵀ)(P Pᵀ)†` exactly
    (pseudo-inverse identity), so the |C|f × f matrix T1 is never built.

    Args:
        cross: `[d, f]` = Y Pᵀ; gram: `[f, f]` = P Pᵀ (float64 recommended; computed on their device).
        solver: "pinv" (the paper's Moore–Penrose pseudo-inverse with the numpy/LAPACK default cutoff
            `f·eps·λmax`) or "ridge" (λ relative to the mean diagonal).
    Returns:
        `LeastSquaresSolution(weight [d, f] float64, method)`. Both solvers factor by Cholesky; "pinv"
        does so only when every eigenvalue clears the cutoff (then `(P Pᵀ)† = (P Pᵀ)⁻¹`), otherwise it
        falls back to the eigendecomposition and says so in `method` ("pinv-fallback").
    """
    if solver not in ("pinv", "ridge"):
        raise ValueError(f"solver must be 'pinv' or 'ridge', got {solver!r}")
    if prior is not None and solver != "ridge":
        raise ValueError("a prior needs solver='ridge' (the pseudo-inverse ignores it)")
    gram = gram + gram.T  # one f×f copy (1.6 GB at f = 14336): symmetrised, then shifted in place
    gram.mul_(0.5)
    if solver == "ridge":
        shift = ridge * gram.diagonal().mean().clamp_min(1e-300)
        gram.diagonal().add_(shift)
        if prior is not None:
            cross = cross + shift * prior.to(dtype=cross.dtype, device=cross.device)
    return _symmetric_solve(cross, gram, pseudo_inverse=solver == "pinv")


def solve_normal_equations(cross: torch.Tensor, gram: torch.Tensor, solver: str = "pinv",
                           ridge: float = 0.0, prior: torch.Tensor | None = None) -> torch.Tensor:
    """The `[d, f]` weight of `fit_normal_equations` (same arguments)."""
    return fit_normal_equations(cross, gram, solver, ridge, prior).weight


def _symmetric_solve(cross: torch.Tensor, gram: torch.Tensor, pseudo_inverse: bool) -> LeastSquaresSolution:
    """`cross · gram⁻¹` by Cholesky, or `cross · gram†` by eigendecomposition when Cholesky is not safe.

    With `pseudo_inverse`, Cholesky must also show the Gram well clear of the pseudo-inverse cutoff;
    without it (ridge: the plain inverse is wanted) a successful factorisation suffices.
    """
    n = gram.shape[0]
    if n == 0:
        return LeastSquaresSolution(cross.new_zeros(cross.shape), "cholesky")
    floor = pinv_cutoff_bound(gram) * CHOLESKY_MARGIN if pseudo_inverse else 0.0
    factor = positive_definite_factor(gram, floor)
    if factor is not None:
        return LeastSquaresSolution(torch.cholesky_solve(cross.T, factor).T, "cholesky")
    return LeastSquaresSolution(times_pseudo_inverse(cross, gram), "pinv-fallback")


def pinv_cutoff_bound(gram: torch.Tensor) -> float:
    """An upper bound on the pseudo-inverse cutoff `n·eps·λmax` of a PSD Gram, using `trace ≥ λmax`.

    Loose only for flat spectra, i.e. exactly when the Gram is far from singular anyway.
    """
    n = gram.shape[0]
    return float(n * torch.finfo(gram.dtype).eps * gram.diagonal().sum().clamp_min(0))


def positive_definite_factor(gram: torch.Tensor, floor: float = 0.0) -> torch.Tensor | None:
    """Lower Cholesky factor of symmetric `gram`, or None when it is not (numerically) `> floor`.

    The factorisation itself proves positive definiteness; the smallest eigenvalue is then
    estimated from the factor (`smallest_eigenvalue_estimate`) and compared to `floor`.
    """
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        return None
    if floor > 0 and not smallest_eigenvalue_estimate(factor) > floor:  # `not >` also rejects NaN
        return None
    return factor


def smallest_eigenvalue_estimate(factor: torch.Tensor, probes: int = 4, steps: int = 4) -> float:
    """Estimate of `λmin(L Lᵀ)` from its Cholesky factor `L` (an upper bound: safe side is the caller's margin).

    The smaller of two upper bounds: the smallest pivot `min L_ii²`, and block inverse iteration
    (`v ← (L Lᵀ)⁻¹ v`, `λmin ≤ 1/‖(L Lᵀ)⁻¹ v‖` for unit v) — `steps` triangular solve pairs on
    `probes` vectors, O(n²) each, negligible beside the factorisation. Like LAPACK's condition
    estimators it is an estimate; near-singular Grams (the dangerous case) converge in one step.
    """
    n = factor.shape[0]
    pivot = float(factor.diagonal().square().min())
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(n, probes, generator=gen, dtype=factor.dtype).to(factor.device)
    growth = torch.zeros((), dtype=factor.dtype, device=factor.device)
    for _ in range(steps):
        v = v / v.norm(dim=0, keepdim=True)
        v = torch.cholesky_solve(v, factor)
        growth = v.norm(dim=0).max()
    inverse_bound = float(1.0 / growth)
    if inverse_bound != inverse_bound:  # NaN from overflowing solves: singular
        return 0.0
    return min(pivot, inverse_bound)


def times_pseudo_inverse(cross: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """`cross · gram†` for a symmetric PSD `gram`, Moore–Penrose with the numpy/LAPACK cutoff `n·eps·max|λ|`.

    Through the eigendecomposition `gram = V Λ Vᵀ`: `((cross V) Λ†) Vᵀ`, without forming `gram†`.
    """
    evals, evecs = torch.linalg.eigh(gram)
    cutoff = evals.abs().max() * gram.shape[0] * torch.finfo(gram.dtype).eps
    inv = torch.where(evals > cutoff, 1.0 / evals.clamp_min(1e-300), torch.zeros_like(evals))
    return ((cross @ evecs) * inv) @ evecs.T


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
