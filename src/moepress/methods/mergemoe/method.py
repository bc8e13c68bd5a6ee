"""MergeMoE (Miao et al. 2025, arXiv 2510.14436 §3–4): merge expert *outputs*, refit the down projection.

Per MoE layer, target M experts:
1. usage frequencies f_j (top-k membership counts on the calibration tokens);
2. clusters: the top-M experts by frequency are centres, every other expert joins the centre most
   similar by flattened [W_U; W_G] (`similarity`: cosine (default) | l2; the paper leaves it open);
3. B_j = f_j / Σ_{k∈C} f_k (Theorem 1); gate/up (and gpt-oss gate/up biases) = B-weighted averages
   (T2 = T3 = [B_1 I, …]);
4. down projection by least squares (Eq. 5–6): `W_D^new = Y_tgt P†` with `P = h_merged(X̂)`,
   `Y_tgt = Σ_j B_j W_D,j h_j(X̂)`, via streamed `Y_tgt Pᵀ` and `P Pᵀ` (T1 never built; with fewer
   tokens than f the rows are kept and the same minimum-norm solution is taken in dual form);
   gpt-oss down bias = Σ_j B_j b_j (exact for the bias part);
5. routing: original N-way router, weights of a cluster summed (`export="custom"`).

Choices the paper leaves open (documented): X̂ defaults to the tokens routed to the cluster (any
member in the token's top-k) — the merged expert only ever sees those tokens, so the fit is spent on
the deployment distribution; `tokens="all"` uses every calibration token. Singleton clusters keep
their expert unchanged (the least squares would return it up to rounding).
"""

from __future__ import annotations

import torch

from ...ops.clustering import centre_grouping, groups_of
from ...ops.least_squares import NormalEquations, warn_if_rank_deficient
from ...ops.merging import frequency_weights
from ..base import LayerContext
from ..merging_common import MergingMethod, average_experts, expert_tensors, weight_similarity
from .config import MergeMoEConfig


def down_projection_equations(view, batches_routed, members: list[int], coefficients: torch.Tensor,
                              merged: dict, i: int, tokens: str) -> NormalEquations:
    """Accumulate `Y_tgt Pᵀ` and `P Pᵀ` of cluster i over the calibration batches (fp64, on the batches' device).

    `batches_routed` yields `(x, routing)`; P = merged gate/up intermediate, Y_tgt = Σ_j B_j W_D,j h_j(x),
    summed in place (one GEMM per member and batch, no per-member temporaries).
    """
    eq = NormalEquations(view.intermediate_size, view.hidden_size)
    member_idx = torch.tensor(members)
    member_weights = [float(coefficients[j]) for j in members]
    for x, routing in batches_routed:
        if tokens == "routed":
            x = x[torch.isin(routing.index, member_idx.to(routing.index.device)).any(dim=-1)]
        if x.shape[0] == 0:
            continue
        p = view.intermediate_of({k: None if v is None else v[i] for k, v in merged.items()}, x)
        y = x.new_zeros(x.shape[0], view.hidden_size)
        for j, weight in zip(members, member_weights):
            y.addmm_(view.intermediate(j, x), view.down_proj[j].T, alpha=weight)
        eq.add(p, y)
    return eq


class MergeMoE(MergingMethod):
    name = "mergemoe"
    summary = "MergeMoE: frequency-centred clusters, weighted gate/up, least-squares down projection"
    config_class = MergeMoEConfig
    needs = ("frequency",)

    def merge(self, ctx: LayerContext, m: int):
        view, frequency = ctx.view, ctx.stats["frequency"]
        tensors = expert_tensors(view)
        expert_map = centre_grouping(frequency, weight_similarity(tensors, self.config.similarity), m)
        coefficients = frequency_weights(frequency, expert_map)
        merged = average_experts(tensors, expert_map, coefficients)  # down = T1 stacked identities
        record = {"merge_weights": [round(float(b), 6) for b in coefficients], "fit_tokens": {}, "fit_solved_by": {}}
        if self.config.down == "lstsq":
            down = merged["down"].clone()
            for i, members in enumerate(groups_of(expert_map)):
                if len(members) == 1:
                    continue
                eq = ctx.stats.reduce(down_projection_equations(  # summed over data-parallel ranks
                    view, ctx.stats.routed(), members, coefficients, merged, i, self.config.tokens))
                record["fit_tokens"][i] = eq.tokens
                warn_if_rank_deficient(eq.tokens, view.intermediate_size,
                                       f"mergemoe layer {view.layer_index} cluster {members}")
                fitted = eq.solve(self.config.solver, self.config.ridge)
                record["fit_solved_by"][i] = eq.solved_by  # "cholesky", or "pinv-fallback" (singular Gram)
                down[i] = fitted.to(down.dtype)
            merged["down"] = down
        return expert_map, merged, record
