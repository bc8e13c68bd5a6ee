"""Truncation-aware (whitened) SVD of expert deltas (D²-MoE §3.3, Eq. 6–8; = SVD-LLM whitening).

With `G = Σ_t x_t x_tᵀ` the Gram matrix of the inputs a projection sees and `S` its Cholesky
factor (`G = S Sᵀ`), the rank-r `L` minimising the activation-weighted error
`‖(ΔW − L) Xᵀ‖_F = ‖(ΔW − L) S‖_F` is the truncated SVD of `ΔW S = U Σ Vᵀ` mapped back:

    ΔU = U_r √Σ_r          [out, r]
    ΔV = √Σ_r V_rᵀ S⁻¹     [r, in]          so  ΔW ≈ ΔU ΔV.

`S⁻¹` is never formed: `ΔV` comes from a triangular solve.

Speed (all float64, on the inputs' device): the whitener is one Cholesky factorisation, with the
eigenvalue clamp (an eigendecomposition: ≈12× the time of this route per expert at H 1024,
I 3584 in benchmarks/layer_speed.py) only when the Gram has eigenvalues below the floor; the
truncated SVD goes through the eigendecomposition of the smaller Gram of `ΔW S`
(`truncated_svd_factors`): two GEMMs and one `min(out, in)`-sized eigh instead of a LAPACK SVD of
the whole matrix (Mixtral gate/up: a 4096² eigh instead of a 14336×4096 SVD; ≈2.4× faster there).
"""

from __future__ import annotations

import torch

from .least_squares import smallest_eigenvalue_estimate

EIGEN_FLOOR = 1e-5  # the released D²-MoE code's clamp
# The estimate is an upper bound on λmin: a factor of 10 above the floor leaves room for its error.
WHITENER_MARGIN = 10.0


def cholesky_whitener(gram: torch.Tensor, floor: float = EIGEN_FLOOR) -> torch.Tensor:
    """Lower-triangular `S` with `S Sᵀ ≈ G` for a Gram matrix `G [n, n]` (float64 result, on G's device).

    Symmetrise, clamp eigenvalues to at least `floor` (makes rank-deficient Grams, e.g. an expert
    routed fewer tokens than `n`, positive definite), then Cholesky. Deviation: the released code
    clamps only when some eigenvalue is <= 0; we always clamp, which changes nothing for
    eigenvalues >= floor and avoids a near-singular `S` from tiny positive ones.

    The clamp is the identity when every eigenvalue exceeds `floor`; then `S = cholesky(G)` with no
    eigendecomposition. That is known from the factor itself when its smallest-eigenvalue estimate
    (`smallest_eigenvalue_estimate`, O(n²)) clears `WHITENER_MARGIN·floor`, else proven by a
    factorisation of `G − floor·I`; only when that fails is the eigenvalue clamp computed.
    """
    g = gram.double()
    g = g + g.T
    g.mul_(0.5)
    factor, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        if smallest_eigenvalue_estimate(factor) > WHITENER_MARGIN * floor or _exceeds(g, floor):
            return factor
    evals, evecs = torch.linalg.eigh(g)
    g = (evecs * evals.clamp_min(floor)) @ evecs.T
    return torch.linalg.cholesky((g + g.T) / 2)


def _exceeds(g: torch.Tensor, floor: float) -> bool:
    """Whether `g − floor·I` is positive definite (Cholesky succeeds), i.e. every eigenvalue of g > floor.

    Shifts the diagonal in place and restores it exactly: no second n×n copy (1.6 GB at n = 14336).
    """
    diagonal = g.diagonal().clone()
    g.diagonal().sub_(floor)
    ok = int(torch.linalg.cholesky_ex(g).info) == 0
    g.diagonal().copy_(diagonal)
    return ok


def truncated_svd_factors(a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(U_r √Σ_r [m, r], √Σ_r V_rᵀ [r, n])`: the top-`rank` SVD of `a [m, n]` split symmetrically.

    Computed from the eigendecomposition of the smaller Gram (`aᵀa = V Σ² Vᵀ` when n <= m, else
    `a aᵀ = U Σ² Uᵀ`) and one product with `a` (`U_r √Σ_r = a V_r Σ_r^{-1/2}`). In float64 the kept
    triplets equal the LAPACK SVD's up to rounding while `σ_r ≫ sqrt(eps)·σ_1 ≈ 1e-8·σ_1`; below that
    singular values lose accuracy, but the product stays `a V_r V_rᵀ` (exact at full rank) because
    the same computed σ scales both factors (|λ| is used where rounding made an eigenvalue negative).
    Directions with λ = 0 exactly (e.g. `a = 0`) get zero factors: `a` has no component along them.
    """
    m, n = a.shape
    tall = n <= m
    b = a if tall else a.T                                   # [M, N], N = min(m, n)
    evals, evecs = torch.linalg.eigh(b.T @ b)                # ascending
    evals, evecs = evals.flip(0)[:rank], evecs.flip(1)[:, :rank]
    positive = evals != 0  # tiny negative ones are rounding: |λ| keeps the product exact (see above)
    quarter = torch.where(positive, evals.abs().clamp_min(1e-300) ** 0.25, torch.ones_like(evals))  # √σ
    outer = (b @ evecs) * torch.where(positive, 1.0 / quarter, torch.zeros_like(evals))      # U_r √Σ_r
    inner = (quarter * positive)[:, None] * evecs.T                                          # √Σ_r V_rᵀ
    return (outer, inner) if tall else (inner.T, outer.T)


def whitened_svd(delta: torch.Tensor, whitener: torch.Tensor | None, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` factors `(U [out, r], V [r, in])` of `delta [out, in]`, float64, on delta's device.

    `whitener` is the lower-triangular `S` of `cholesky_whitener` (None = plain SVD, i.e. S = I).
    At `rank >= min(out, in)` the product `U V` equals `delta` up to rounding.
    """
    d = delta.double()
    rank = max(0, min(int(rank), *d.shape))
    scaled = d if whitener is None else d @ whitener.double()
    left, right = truncated_svd_factors(scaled, rank)
    if whitener is not None:
        # right = B S⁻¹  <=>  Sᵀ rightᵀ = Bᵀ  (Sᵀ is upper triangular)
        right = torch.linalg.solve_triangular(whitener.double().T, right.T, upper=True).T
    return left, right


def shared_v_whitened_svd(
    deltas: torch.Tensor, whitener: torch.Tensor | None, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One shared `V` for all experts of a projection (D²-MoE `--share_V`, Table 11 "ShareV").

    Stacks `[ΔW_1; …; ΔW_E]` (`deltas [E, out, in]`) into `[E·out, in]` and runs `whitened_svd`
    with one whitener (the released code uses the frequency-weighted mean Gram's factor).
    Returns `(U [E, out, r], V [r, in])`.
    """
    e, out, n = deltas.shape
    left, right = whitened_svd(deltas.reshape(e * out, n), whitener, rank)
    return left.reshape(e, out, -1), right


def activation_error(delta: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """`‖(ΔW − L) Xᵀ‖_F²` computed from the Gram `G = XᵀX` as `trace(E G Eᵀ)`."""
    err = (delta - approx).double()
    return torch.einsum("oi,ij,oj->", err, gram.double(), err)
