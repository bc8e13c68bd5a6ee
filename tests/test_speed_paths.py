"""The fast heavy-stage paths give the reference results: Cholesky least squares vs lstsq/pinv, the
pseudo-inverse fallback, the Cholesky-first whitener, the Gram-eigh truncated SVD, grouped Grams."""

from __future__ import annotations

import pytest
import torch

from moepress.arch import moe_layer_views
from moepress.testing import tiny_model
from moepress.calib.stats import LayerStatistics
from moepress.methods import LayerContext, build_method
from moepress.methods.d2moe.stats import expert_gram, tokens_by_expert
from moepress.ops.least_squares import NormalEquations, fit_normal_equations, smallest_eigenvalue_estimate
from moepress.ops.whitened_svd import EIGEN_FLOOR, cholesky_whitener, truncated_svd_factors, whitened_svd


def _data(tokens, features, outputs, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, features, generator=gen, dtype=dtype),
            torch.randn(tokens, outputs, generator=gen, dtype=dtype))


def _relative(a, b):
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------- least squares
@pytest.mark.parametrize("tokens", [40, 600])  # dual (rows held, t < f) and Gram mode
def test_streamed_float32_least_squares_matches_lstsq_by_cholesky(tokens):
    p, y = _data(tokens, 64, 12, dtype=torch.float32)
    eq = NormalEquations(64, 12)
    for start in range(0, tokens, 100):
        eq.add(p[start:start + 100], y[start:start + 100])
    w = eq.solve()
    assert eq.solved_by == "cholesky"
    reference = torch.linalg.lstsq(p.double(), y.double(), driver="gelsd").solution.T  # min-norm when t < f
    assert _relative(w, reference) < 1e-5


def test_rank_deficient_gram_falls_back_to_the_pseudo_inverse():
    p, y = _data(300, 48, 7)
    p[:, 5] = 2 * p[:, 1] - p[:, 9]  # exact dependencies: P Pᵀ singular
    p[:, 30] = p[:, 2]
    solution = fit_normal_equations(y.T @ p, p.T @ p)
    assert solution.method == "pinv-fallback"
    reference = torch.linalg.lstsq(p, y, driver="gelsd").solution.T  # the minimum-norm solution = Y P†
    torch.testing.assert_close(solution.weight, reference, atol=1e-9, rtol=1e-9)
    eq = NormalEquations(48, 7)
    eq.add(p, y)
    torch.testing.assert_close(eq.solve(), reference, atol=1e-9, rtol=1e-9)
    assert eq.solved_by == "pinv-fallback"


def test_gram_that_factors_but_is_below_the_cutoff_still_gets_the_pseudo_inverse():
    """A singular Gram nudged just positive factors by Cholesky; the eigenvalue check must catch it."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(64, 40, generator=gen, dtype=torch.float64)
    gram = a @ a.T                                             # rank 40 of 64
    gram += 1e-15 * torch.linalg.eigvalsh(gram).max() * torch.eye(64, dtype=torch.float64)
    assert int(torch.linalg.cholesky_ex(gram).info) == 0       # the factorisation alone would accept it
    cross = torch.randn(5, 64, generator=gen, dtype=torch.float64)
    solution = fit_normal_equations(cross, gram)
    assert solution.method == "pinv-fallback"
    reference = cross @ torch.linalg.pinv(gram, hermitian=True)
    assert _relative(solution.weight, reference) < 1e-9
    # well clear of the cutoff, the same Gram is solved by Cholesky and equals the inverse
    gram += 1e-6 * torch.eye(64, dtype=torch.float64) * torch.linalg.eigvalsh(gram).max()
    solution = fit_normal_equations(cross, gram)
    assert solution.method == "cholesky"
    assert _relative(solution.weight, torch.linalg.solve(gram, cross.T).T) < 1e-9


def test_smallest_eigenvalue_estimate_is_close_from_above():
    gen = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(50, 50, generator=gen, dtype=torch.float64))
    evals = torch.logspace(0, -7, 50, dtype=torch.float64)
    gram = (q * evals) @ q.T
    estimate = smallest_eigenvalue_estimate(torch.linalg.cholesky(gram))
    assert evals.min() * (1 - 1e-6) <= estimate < 2 * evals.min()


def test_ridge_solves_by_cholesky_and_equals_the_regularised_inverse():
    p, y = _data(200, 32, 6)
    gram, cross = p.T @ p, y.T @ p
    solution = fit_normal_equations(cross, gram, "ridge", 1e-2)
    assert solution.method == "cholesky"
    reg = gram + 1e-2 * gram.diagonal().mean() * torch.eye(32, dtype=torch.float64)
    assert _relative(solution.weight, torch.linalg.solve(reg, cross.T).T) < 1e-12


def test_unknown_solver_is_refused_with_the_allowed_ones():
    with pytest.raises(ValueError, match="'pinv' or 'ridge'"):
        fit_normal_equations(torch.zeros(2, 3), torch.eye(3), "lu")


def test_mergemoe_records_how_each_cluster_was_solved():
    model = tiny_model("mixtral")
    view = moe_layer_views(model)[0]
    gen = torch.Generator().manual_seed(0)
    stats = LayerStatistics(view, [torch.randn(300, view.hidden_size, generator=gen) for _ in range(2)])
    record = build_method("mergemoe", experts=4).compress_layer(LayerContext(view, stats, 0, 1)).record
    fitted = [i for i, members in enumerate(record["groups"]) if len(members) > 1]
    assert fitted and sorted(record["fit_solved_by"]) == fitted
    assert set(record["fit_solved_by"].values()) == {"cholesky"}


# ---------------------------------------------------------------- whitened SVD
def test_cholesky_whitener_fast_path_is_the_clamped_reference():
    x, _ = _data(400, 24, 1, seed=3)
    gram = x.T @ x                                             # eigenvalues far above the floor
    evals, evecs = torch.linalg.eigh(gram)
    reference = torch.linalg.cholesky((evecs * evals.clamp_min(EIGEN_FLOOR)) @ evecs.T)
    torch.testing.assert_close(cholesky_whitener(gram), reference, atol=1e-10, rtol=1e-10)
    assert torch.equal(cholesky_whitener(gram), torch.linalg.cholesky(gram))  # no eigh on this path
    # eigenvalues just above the floor (inside the estimate's margin): proven by G − floor·I, no clamp
    near = (evecs * torch.linspace(2, 5, 24, dtype=torch.float64) * EIGEN_FLOOR) @ evecs.T
    near = (near + near.T) / 2
    torch.testing.assert_close(cholesky_whitener(near), torch.linalg.cholesky(near), atol=0, rtol=0)
    # an eigenvalue under the floor takes the clamp: S Sᵀ has it raised to exactly the floor
    low = (evecs * evals.clamp_max(1e-7)) @ evecs.T
    s = cholesky_whitener(low)
    torch.testing.assert_close(torch.linalg.eigvalsh(s @ s.T), evals.clamp_max(1e-7).clamp_min(EIGEN_FLOOR),
                               atol=1e-9, rtol=1e-6)


@pytest.mark.parametrize("shape", [(90, 40), (40, 90)])
def test_truncated_svd_factors_equal_the_lapack_truncation(shape):
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(*shape, generator=gen, dtype=torch.float64) @ torch.diag(torch.logspace(0, -3, shape[1],
                                                                                            dtype=torch.float64))
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    for rank in (0, 1, 7, 25, 40):
        left, right = truncated_svd_factors(a, rank)
        assert left.shape == (shape[0], rank) and right.shape == (rank, shape[1])
        torch.testing.assert_close(left @ right, (u[:, :rank] * s[:rank]) @ vh[:rank], atol=1e-12, rtol=1e-9)
        # the split is symmetric: both factors carry √σ
        torch.testing.assert_close(left.norm(dim=0) ** 2, s[:rank], atol=1e-12, rtol=1e-9)
    zero_left, zero_right = truncated_svd_factors(torch.zeros(*shape, dtype=torch.float64), 3)
    assert not zero_left.any() and not zero_right.any()


def test_whitened_svd_minimises_the_activation_error_like_the_lapack_route():
    x, _ = _data(300, 32, 1, seed=5)
    x = x @ torch.randn(32, 32, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    delta = torch.randn(48, 32, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    whitener = cholesky_whitener(x.T @ x)
    u, s, vh = torch.linalg.svd(delta @ whitener, full_matrices=False)
    for rank in (4, 16):
        left, right = whitened_svd(delta, whitener, rank)
        lapack = torch.linalg.solve_triangular(whitener.T, ((u[:, :rank] * s[:rank]) @ vh[:rank]).T, upper=True).T
        torch.testing.assert_close(left @ right, lapack, atol=1e-9, rtol=1e-7)


# ---------------------------------------------------------------- grouped Grams
def test_tokens_by_expert_groups_every_routed_pair_once():
    index = torch.tensor([[2, 0], [1, 2], [0, 3], [2, 1]])
    groups = dict(tokens_by_expert(index, 5))
    assert sorted(groups) == [0, 1, 2, 3]  # expert 4 received nothing
    for j, rows in groups.items():
        assert rows.tolist() == (index == j).any(-1).nonzero().squeeze(-1).tolist()


@pytest.mark.parametrize("family,batch", [("qwen3_moe", 70), ("gpt_oss", 70), ("mixtral", 1500)])
def test_expert_gram_equals_the_masked_float64_reference(family, batch):
    """Small per-expert row counts take the float64 product, large ones (batch 1500) the float32 one."""
    view = moe_layer_views(tiny_model(family))[0]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(batch, view.hidden_size, generator=gen) for _ in range(3)]
    grams = expert_gram(LayerStatistics(view, batches))
    x = torch.cat(batches)
    routed = view.route(x).index
    with torch.no_grad():
        for j in range(view.num_experts):
            xj = x[(routed == j).any(-1)]
            hj = view.intermediate(j, xj).double()
            torch.testing.assert_close(grams["input"][j], xj.double().T @ xj.double(), atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(grams["intermediate"][j], hj.T @ hj, atol=1e-4, rtol=1e-5)
    assert grams["input"].dtype == torch.float64 and grams["input"].device.type == "cpu"
