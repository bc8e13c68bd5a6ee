"""Truncation-aware (whitened) SVD of expert deltas (D²-MoE §3.3, Eq. 6–8; = SVD-LLM whitening).

With `G = Σ_t x_t x_tᵀ` the Gram matrix of the inputs a projection sees and `S` its Cholesky
factor (`G = S Sᵀ`), the rank-r `L` minimising the activation-weighted error
`‖(ΔW − L) Xᵀ‖_F = ‖(ΔW − L) S‖_F` is the truncated SVD of `ΔW S = U Σ Vᵀ` mapped back:

    ΔU = U_r √Σ_r          [out, r]
    ΔV = √Σ_r V_rᵀ S⁻¹     [r, in]          so  ΔW ≈ ΔU ΔV.

`S⁻¹` is never formed: `ΔV` comes from a triangular solve.
"""

from __future__ import annotations

import torch

EIGEN_FLOOR = 1e-5  # the released D²-MoE code's clamp


def cholesky_whitener(gram: torch.Tensor, floor: float = EIGEN_FLOOR) -> torch.Tensor:
    """Lower-triangular `S` with `S Sᵀ ≈ G` for a Gram matrix `G [n, n]` (float64 result).

    Symmetrise, clamp eigenvalues to at least `floor` (makes rank-deficient Grams, e.g. an expert
    routed fewer tokens than `n`, positive definite), then Cholesky. Deviation: the released code
    clamps only when some eigenvalue is <= 0; we always clamp, which changes nothing for
    eigenvalues >= floor and avoids a near-singular `S` from tiny positive ones.
    """
    g = gram.double()
    g = (g + g.T) / 2
    evals, evecs = torch.linalg.eigh(g)
    g = (evecs * evals.clamp_min(floor)) @ evecs.T
    return torch.linalg.cholesky((g + g.T) / 2)


def whitened_svd(delta: torch.Tensor, whitener: torch.Tensor | None, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` factors `(U [out, r], V [r, in])` of `delta [out, in]`, float64.

    `whitener` is the lower-triangular `S` of `cholesky_whitener` (None = plain SVD, i.e. S = I).
    At `rank >= min(out, in)` the product `U V` equals `delta` up to rounding.
    """
    d = delta.double()
    rank = max(0, min(int(rank), *d.shape))
    scaled = d if whitener is None else d @ whitener
    u, s, vh = torch.linalg.svd(scaled, full_matrices=False)
    root = s[:rank].sqrt()
    left = u[:, :rank] * root
    right = root[:, None] * vh[:rank]
    if whitener is not None:
        # right = B S⁻¹  <=>  Sᵀ rightᵀ = Bᵀ  (Sᵀ is upper triangular)
        right = torch.linalg.solve_triangular(whitener.T, right.T, upper=True).T
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
