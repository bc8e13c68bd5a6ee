"""Least-squares refit of a compressed layer's down projections against what the layer must output.

MergeMoE (docs/algorithms.md#mergemoe, step 4) refits each merged expert's down projection so that its output
matches the frequency-weighted average of its members' outputs on every token routed to the cluster.
That target ignores the routing weights: on a token that chose one member with weight 0.1, the
merged expert still has to produce the full average of all members, although the layer only ever
uses `0.1 x` its output. The fits here put the routing weights in (our addition; measured in
`benchmarks/merging_quality.py` and the diagnostics of `benchmarks/merging_diagnostics.py`):

- `fit_own_share` — each compressed expert i against its own share of the original layer output,
  `min_W Σ_t ‖ s_i(t) (W h_i(x_t) + b_i) − Σ_{j∈C_i} g_j(t) E_j(x_t) ‖²` (s_i = the weight the
  compressed layer gives expert i, g_j = the original routing weights).
- `fit_layer_output` — all compressed experts of the layer jointly against the whole original
  routed output, `min_{W_1..W_M} Σ_t ‖ Σ_i s_i(t)(W_i h_i(x_t) + b_i) − Σ_j g_j(t) E_j(x_t) ‖²`,
  by block Gauss–Seidel (one expert's W at a time, the others fixed; each step solves its block
  exactly, so the objective never increases). Works for any routing of the compressed layer:
  the remapped block (cluster sums) and a pruned stock block (router rows sliced).

Both solve with `ops.least_squares` for the *change* of each down projection from its starting
value (the frequency average for merged experts, the expert's own for kept ones): pinv gives the
minimum-norm change, ridge pulls toward a prior W0 (`solve_normal_equations`). Eq. 6's plain `P†`
gives the minimum-norm W instead, which zeroes every direction the calibration tokens leave
unexcited — harmless with many tokens, a collapse with few (docs/algorithms.md#mergemoe; the paper's Fig. 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable
import torch

from ..arch import MoELayerView, Routing
from ..ops.least_squares import NormalEquations, warn_if_rank_deficient
from ..ops.routing_weights import dense_routing


@dataclass
class RefitProblem:
    """A compressed layer whose down projections are to be refitted.

    view: the ORIGINAL layer (targets come from its experts and routing).
    batches: `(x [t, H], original routing)` pairs (`LayerStatistics.routed()`, as a list).
    compressed_weights: per batch, `[t, M]` the weight each compressed expert gets per token.
    intermediate: `(i, x) -> [t, I]` the intermediate activation of compressed expert i.
    down: `[M, H, I]` current down projections (view convention); updated in place by the fits.
    down_bias: `[M, H]` fixed down biases (gpt-oss) or None.
    solver, ridge: as `solve_normal_equations`; prior: `[M, H, I]` W0 of the ridge, or None (toward 0).
    reduce: sums a value over data-parallel ranks (`LayerStatistics.reduce`; identity in one
        process): every rank's normal equations and error sums are reduced before a solve or a
        ratio, so all ranks fit from the whole calibration set, as for the paper's fit.
    """

    view: MoELayerView
    batches: list[tuple[torch.Tensor, Routing]]
    compressed_weights: list[torch.Tensor]
    intermediate: Callable[[int, torch.Tensor], torch.Tensor]
    down: torch.Tensor
    down_bias: torch.Tensor | None = None
    solver: str = "pinv"
    ridge: float = 0.0
    prior: torch.Tensor | None = None
    reduce: Callable | None = None

    def __post_init__(self):
        if self.reduce is None:
            self.reduce = _identity

    def features(self, i: int, b: int):
        """Batch b: (tokens routed to compressed expert i, their weights `[t_i, 1]`, features `s_i h_i [t_i, I]`)."""
        x, weight = self.batches[b][0], self.compressed_weights[b][:, i]
        token = torch.nonzero(weight).flatten()
        s = weight[token].unsqueeze(-1)
        return token, s, s.to(x.dtype) * self.intermediate(i, x[token])

    def bias_part(self, i: int, s: torch.Tensor) -> torch.Tensor | float:
        return 0.0 if self.down_bias is None else s * self.down_bias[i].double()

    def own_output(self, i: int, f: torch.Tensor) -> torch.Tensor:
        """`s_i W_i h_i` `[t_i, H]` fp64 with the current down projection (features `f = s_i h_i`)."""
        return f.double() @ self.down[i].double().T

    def update(self, i: int, eq: NormalEquations, what: str) -> NormalEquations:
        """Add to `down[i]` the least-squares change `ΔW` solving `eq` (accumulated on residuals).

        pinv: the minimum-norm change, so directions the calibration tokens never excite keep their
        starting value (Eq. 6's `P†` would zero them); ridge: `‖ΔW P − R‖² + λ'‖W + ΔW − W0‖²`,
        i.e. the ridge toward W0 (= `prior[i]`, or 0) of `solve_normal_equations`.
        Every rank calls it for the same `i` in the same order (the sums are reduced here).
        """
        eq = self.reduce(eq)
        if self.solver == "pinv":
            warn_if_rank_deficient(eq.tokens, self.down.shape[-1], what)
        if not eq.tokens:
            return eq
        current = self.down[i].double()
        prior = None
        if self.solver == "ridge":
            prior = (torch.zeros_like(current) if self.prior is None else self.prior[i].double()) - current
        self.down[i] = (current + eq.solve(self.solver, self.ridge, prior)).to(self.down.dtype)
        return eq  # the reduced equations (their token count is the global one)


def _identity(value):
    return value


def fit_own_share(problem: RefitProblem, members: list[list[int]], skip_singletons: bool = True) -> dict[int, int]:
    """Refit each compressed expert i against `Σ_{j∈members[i]} g_j E_j` (its members' routed output).

    A singleton whose expert is unchanged is already exact (the fit would return it); it is skipped.
    Returns {expert: tokens fitted}.
    """
    view, fitted = problem.view, {}
    for i, group in enumerate(members):
        if skip_singletons and len(group) == 1:
            continue
        eq = NormalEquations(view.intermediate_size, view.hidden_size)
        for b, (x, routing) in enumerate(problem.batches):
            token, s, f = problem.features(i, b)
            if token.numel() == 0:
                continue
            g = dense_routing(routing.weights[token], routing.index[token], view.num_experts)
            target = sum(g[:, j:j + 1] * view.expert(j, x[token]).double() for j in group if g[:, j].any())
            eq.add(f, target - problem.bias_part(i, s) - problem.own_output(i, f))
        eq = problem.update(i, eq, f"layer {view.layer_index} compressed expert {i} (members {group})")
        fitted[i] = eq.tokens
    return fitted


def compressed_output(problem: RefitProblem, b: int) -> torch.Tensor:
    """Batch b: `Σ_i s_i (W_i h_i + b_i)` `[t, H]` fp64 with the current down projections."""
    out = torch.zeros(problem.batches[b][0].shape[0], problem.view.hidden_size, dtype=torch.float64)
    for i in range(problem.down.shape[0]):
        token, s, f = problem.features(i, b)
        if token.numel():
            out[token] += f.double() @ problem.down[i].double().T + problem.bias_part(i, s)
    return out


def fit_layer_output(problem: RefitProblem, sweeps: int = 1) -> dict:
    """Block Gauss–Seidel on the whole layer's output error (module docstring); `sweeps` passes.

    Memory: the original and the current compressed outputs of the calibration tokens (fp64,
    two copies of the layer's inputs in size). Returns {"tokens": {expert: tokens}, "rel_error":
    [relative calibration error before, after each sweep]}.
    """
    view, m = problem.view, problem.down.shape[0]
    with torch.no_grad():
        targets = [view.routed_output(x, r).double() for x, r in problem.batches]
        current = [compressed_output(problem, b) for b in range(len(problem.batches))]
    norm = problem.reduce(sum(float(t.pow(2).sum()) for t in targets)) or 1.0

    def rel_error() -> float:
        error = problem.reduce(sum(float((c - t).pow(2).sum()) for c, t in zip(current, targets)))
        return round((error / norm) ** 0.5, 6)

    errors, tokens = [rel_error()], {}
    for _ in range(sweeps):
        for i in range(m):
            eq = NormalEquations(view.intermediate_size, view.hidden_size)
            cached = []
            for b in range(len(problem.batches)):
                token, s, f = problem.features(i, b)
                if token.numel() == 0:
                    continue
                own = problem.own_output(i, f)
                eq.add(f, targets[b][token] - current[b][token])  # the others' outputs held fixed
                cached.append((b, token, f, own))
            old = problem.down[i].clone()
            eq = problem.update(i, eq, f"layer {view.layer_index} compressed expert {i}")
            if not torch.equal(old, problem.down[i]):
                for b, token, f, own in cached:
                    current[b][token] += problem.own_output(i, f) - own
            tokens[i] = eq.tokens
        errors.append(rel_error())
    return {"tokens": tokens, "rel_error": errors}
