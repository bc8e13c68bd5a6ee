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

Options beyond the paper (defaults = the paper), found by the diagnostics quoted in README /
`benchmarks/merging_diagnostics.py` on the trained reference models:
- `target="routed"`: step 4's target asks the merged expert to reproduce the *average* of all its
  members on every routed token, although the layer uses `s(x) E'(x)` with `s(x)` the summed
  routing weight of the members the token actually chose. Fitting `s(x) E'(x)` to
  `Σ_{j∈C∩topk(x)} g_j E_j(x)` instead (the cluster's exact share of the layer output) cut the
  held-out layer error of mixtral-ref at 50% by ~45% (methods/down_refit.py `fit_own_share`).
- `target="layer"`: all merged experts jointly against the whole layer output (`fit_layer_output`).
- `prior="average"` (with `solver="ridge"`): ridge toward the members' frequency-average down
  projection instead of toward 0 — least squares on one calibration domain otherwise extrapolates
  badly to other text (relative layer error > 1 on code after calibrating on kernel docs).
- `similarity="output"`: members join the centre whose mean output over the calibration tokens is
  most similar (HC-SMoE's features) rather than by weights; experts trained apart have unrelated
  weight spaces, so output similarity names better partners.
"""

from __future__ import annotations

import dataclasses

import torch

from ...ops.clustering import centre_grouping, groups_of, similarity_from_gram
from ...ops.least_squares import NormalEquations, warn_if_rank_deficient
from ...ops.merging import frequency_weights
from ...ops.routing_weights import cluster_routing, dense_routing
from ..base import LayerContext, Requirements
from ..down_refit import RefitProblem, fit_layer_output, fit_own_share
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


def merged_expert_of(merged: dict, i: int) -> dict:
    return {k: None if v is None else v[i] for k, v in merged.items()}


class MergeMoE(MergingMethod):
    name = "mergemoe"
    summary = "MergeMoE: frequency-centred clusters, weighted gate/up, least-squares down projection"
    config_class = MergeMoEConfig
    needs = ("frequency",)

    def requirements(self) -> Requirements:
        if self.config.similarity != "output":
            return super().requirements()
        return dataclasses.replace(super().requirements(), statistics=("frequency", "expert_output_mean"))

    def similarity(self, ctx: LayerContext, tensors: dict) -> torch.Tensor:
        if self.config.similarity == "output":
            features = ctx.stats["expert_output_mean"]  # HC-SMoE's statistic (methods/hcsmoe)
            return similarity_from_gram(features @ features.T, "cosine")
        return weight_similarity(tensors, self.config.similarity)

    def merge(self, ctx: LayerContext, m: int):
        view, frequency = ctx.view, ctx.stats["frequency"]
        tensors = expert_tensors(view)
        expert_map = centre_grouping(frequency, self.similarity(ctx, tensors), m)
        coefficients = frequency_weights(frequency, expert_map)
        merged = average_experts(tensors, expert_map, coefficients)  # down = T1 stacked identities
        record = {"merge_weights": [round(float(b), 6) for b in coefficients], "fit_tokens": {}, "fit_solved_by": {}}
        if self.config.down == "lstsq" and self.config.target == "paper":
            merged["down"] = self.fit_paper(ctx, expert_map, coefficients, merged, record)
        elif self.config.down == "lstsq":
            merged["down"] = self.fit_routed(ctx, expert_map, merged, record)
        return expert_map, merged, record

    def fit_paper(self, ctx: LayerContext, expert_map, coefficients, merged: dict, record: dict) -> torch.Tensor:
        """Eq. 5–6: each cluster's down projection against `Σ_j B_j E_j` on its tokens."""
        view, down = ctx.view, merged["down"].clone()
        prior = merged["down"] if self.config.prior == "average" else None
        for i, members in enumerate(groups_of(expert_map)):
            if len(members) == 1:
                continue
            eq = ctx.stats.reduce(down_projection_equations(  # summed over data-parallel ranks
                view, ctx.stats.routed(), members, coefficients, merged, i, self.config.tokens))
            record["fit_tokens"][i] = eq.tokens
            warn_if_rank_deficient(eq.tokens, view.intermediate_size,
                                   f"mergemoe layer {view.layer_index} cluster {members}")
            fitted = eq.solve(self.config.solver, self.config.ridge, None if prior is None else prior[i])
            record["fit_solved_by"][i] = eq.solved_by  # "cholesky", or "pinv-fallback" (singular Gram)
            down[i] = fitted.to(down.dtype)
        return down

    def fit_routed(self, ctx: LayerContext, expert_map, merged: dict, record: dict) -> torch.Tensor:
        """target=routed|layer: the fits of methods/down_refit.py with the remapped block's routing."""
        view = ctx.view
        batches = list(ctx.stats.routed())
        weights = [cluster_routing(dense_routing(r.weights, r.index, view.num_experts), expert_map.to(r.index.device))
                   for _, r in batches]
        problem = RefitProblem(
            view, batches, weights,
            intermediate=lambda i, x: view.intermediate_of(merged_expert_of(merged, i), x),
            down=merged["down"].clone(), down_bias=merged["down_bias"],
            solver=self.config.solver, ridge=self.config.ridge,
            prior=merged["down"] if self.config.prior == "average" else None, reduce=ctx.stats.reduce)
        if self.config.target == "routed":
            record["fit_tokens"] = fit_own_share(problem, groups_of(expert_map))
        else:
            fit = fit_layer_output(problem, sweeps=int(self.config.sweeps))
            record["fit_tokens"], record["fit_rel_error"] = fit["tokens"], fit["rel_error"]
        return problem.down
