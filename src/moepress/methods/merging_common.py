"""Shared shape of the expert-merging methods (average, msmoe, hcsmoe, zipit, mergemoe).

A merging method decides, per MoE layer, an expert map `[N] -> [0, M)` and the M merged experts
(view convention: gate/up `[M, I, H]`, down `[M, H, I]`, gpt-oss biases). This module turns that
decision into a block:

- `export="custom"` (default): `RemappedMoeBlock` — the model's own N-way router, routing weights of
  one cluster summed (MergeMoE §3 matrix A). Exactly the method as published; needs the moepress
  modeling code (auto_map) to load. `"exact"`, the option's former name, is accepted as an alias.
- `export="stock"`: the family's own block with M experts and an M-row router fitted by least
  squares to the summed routing (`fit_merged_router`, see ops/router_fit.py). Loads in plain
  transformers/vLLM; the router is an approximation, so outputs differ from the exact block.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..arch import MoELayerView, moe_layer_views, set_model_expert_count, validate_expert_count
from ..calib.stats import LayerStatistics, statistic
from ..modeling.moepress_remap import RemappedMoeBlock
from ..ops.clustering import groups_of, similarity_from_gram
from ..ops.least_squares import NormalEquations, solve_normal_equations
from ..ops.merging import weighted_merge
from ..ops.router_fit import summed_sigmoid_target, summed_softmax_target, with_intercept
from .base import ConfigError, Finalized, LayerContext, LayerResult, Method, MethodConfig, Requirements

EXPERT_TENSORS = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")
EXPORT_ALIASES = {"exact": "custom"}  # the option's first name, kept for existing scripts


@dataclass
class MergingConfig(MethodConfig):
    """`export` uses the vocabulary of `Method.export` (custom|stock); the earlier spelling `exact`
    is still accepted for `custom` (users' scripts and recipes keep working) and stored as `custom`."""

    export: str = field(default="custom", metadata={
        "help": "custom: N-way router + expert map (custom block, the paper's method; 'exact' is an alias); "
                "stock: family's own block with a least-squares-fitted M-row router (approximate)"})

    def __post_init__(self):
        super().__post_init__()
        self.export = EXPORT_ALIASES.get(self.export, self.export)
        if self.export not in ("custom", "stock"):
            raise ConfigError(f"export must be 'custom' (alias 'exact') or 'stock', got {self.export!r}")


def expert_tensors(view: MoELayerView) -> dict[str, torch.Tensor | None]:
    """The layer's routed experts in the view convention, detached (biases None when absent)."""
    out = {"gate": view.gate_proj, "up": view.up_proj, "down": view.down_proj,
           "gate_bias": view.gate_bias, "up_bias": view.up_bias, "down_bias": view.down_bias}
    return {k: None if v is None else v.detach() for k, v in out.items()}


def average_experts(tensors: dict, expert_map: torch.Tensor, coefficients: torch.Tensor) -> dict:
    """Every expert tensor merged as `Σ_{j∈C_i} B_j W_j` (M-SMoE / HC-SMoE / average)."""
    return {k: None if v is None else weighted_merge(v, expert_map, coefficients) for k, v in tensors.items()}


def build_remap_block(view: MoELayerView, expert_map: torch.Tensor, merged: dict) -> RemappedMoeBlock:
    """The exact merged block: the view's router and shared experts + M merged experts."""
    return RemappedMoeBlock.from_weights(view.block, view.config, expert_map, **merged)


def fit_merged_router(view: MoELayerView, stats: LayerStatistics, expert_map: torch.Tensor,
                      ridge: float = 1e-6) -> dict[str, torch.Tensor]:
    """M-row router tensors approximating the cluster-summed N-way routing (ops/router_fit.py).

    Least squares over all calibration tokens `min_W Σ_x ‖W x̃ − t(x)‖²` with `x̃ = [x; 1]` when the
    router has a bias (gpt-oss), else `x̃ = x`; tiny ridge relative to the Gram's mean diagonal.
    """
    tensors = view.router_tensors()
    has_bias = "bias" in tensors
    sigmoid = view.score_kind == "sigmoid"
    m = int(expert_map.max()) + 1
    eq = NormalEquations(view.hidden_size + int(has_bias), m)
    for x, routing in stats.routed():
        scores = routing.scores.detach()
        target = summed_sigmoid_target(scores, expert_map) if sigmoid else summed_softmax_target(scores, expert_map)
        eq.add(with_intercept(x) if has_bias else x, target)
    eq = stats.reduce(eq)  # sums over data-parallel ranks
    solution = solve_normal_equations(eq.cross, eq.gram, solver="ridge", ridge=ridge)
    weight = tensors["weight"]
    out = {"weight": solution[:, : view.hidden_size].to(weight.dtype, copy=True).to(weight.device)}
    if has_bias:
        out["bias"] = solution[:, -1].to(tensors["bias"].dtype).to(weight.device)
    if "e_score_correction_bias" in tensors:  # selection-only bias: the members' mean
        corr = tensors["e_score_correction_bias"].detach()
        out["e_score_correction_bias"] = weighted_merge(
            corr[:, None], expert_map.to(corr.device), 1.0 / torch.bincount(expert_map).double()[expert_map]
        )[:, 0]
    return out


def build_stock_block(view: MoELayerView, stats: LayerStatistics, expert_map: torch.Tensor, merged: dict):
    """The family's own block with the M merged experts and a fitted M-row router (approximate)."""
    m = merged["gate"].shape[0]
    try:
        validate_expert_count(view.config, m)
    except ValueError as exc:
        raise ConfigError(f"export='stock' is impossible here: {exc}; use export='custom'") from None
    router = fit_merged_router(view, stats, expert_map)
    biases = {k: merged[k] for k in ("gate_bias", "up_bias", "down_bias") if merged[k] is not None}
    return view.rebuild(merged["gate"], merged["up"], merged["down"], router, **biases)


@statistic("router_logit_similarity", summed=False)
def router_logit_similarity(stats: LayerStatistics) -> torch.Tensor:
    """`[N, N]` cosine similarity of the experts' router-logit columns over the calibration tokens.

    M-SMoE's default `--similarity_base router-logits`: expert j is described by its logit on every
    token; streamed as the Gram `Σ_x z(x) z(x)ᵀ` (fp64).
    """
    n = stats.view.num_experts
    gram = torch.zeros(n, n, dtype=torch.float64, device=stats.device)
    for _, r in stats.routed():
        z = r.logits.detach().double()
        gram += z.T @ z
    gram = stats.reduce(gram)  # summed over data-parallel ranks before normalising
    d = gram.diagonal().clamp_min(1e-300).sqrt()
    return gram / torch.outer(d, d)


def weight_similarity(tensors: dict, metric: str = "cosine") -> torch.Tensor:
    """`[N, N]` similarity of flattened `[W_U; W_G]` per expert (MergeMoE §4 clustering).

    `<[U_i; G_i], [U_j; G_j]> = <U_i, U_j> + <G_i, G_j>`: two Grams of flattened views, no concatenation.
    """
    gram = sum(t.flatten(1).float() @ t.flatten(1).float().T for t in (tensors["up"], tensors["gate"]))
    return similarity_from_gram(gram, metric)


def layer_relative_error(view: MoELayerView, block, batches: list[torch.Tensor], reduce=None) -> float:
    """`Σ‖block(x) − original(x)‖² / Σ‖original(x)‖²` over the calibration batches (whole block output).

    `reduce` sums the two totals over data-parallel ranks (`LayerStatistics.reduce`)."""
    num = den = 0.0
    for x in batches:
        ref, out = view.forward(x), view.forward(x, block)
        num += float((out.double() - ref.double()).pow(2).sum())
        den += float(ref.double().pow(2).sum())
    if reduce is not None:
        num, den = reduce([num, den])
    return (num / max(den, 1e-300)) ** 0.5


class MergingMethod(Method):
    """Base of merging methods: subclasses implement `merge(ctx, m) -> (expert_map, merged, record)`."""
    ratio_help = ("fraction of each layer's routed experts merged away: the N experts become round(N x (1 - "
                  "ratio)) merged ones, so the same fraction of routed-expert parameters; active parameters per "
                  "token are unchanged")

    export = "custom"
    keeps_expert_count = True

    def requirements(self) -> Requirements:  # stock block + fitted router, or custom block
        return dataclasses.replace(super().requirements(), export=self.config.export)

    def merge(self, ctx: LayerContext, m: int) -> tuple[torch.Tensor, dict, dict]:
        raise NotImplementedError

    def compress_layer(self, ctx: LayerContext) -> LayerResult:
        view = ctx.view
        m = self.config.kept_experts(view.num_experts, view.top_k, ctx.experts)
        with torch.no_grad():
            expert_map, merged, extra = self.merge(ctx, m)
            if self.config.export == "stock":
                block = build_stock_block(view, ctx.stats, expert_map, merged)
            else:
                block = build_remap_block(view, expert_map, merged)
            error = layer_relative_error(view, block, ctx.stats.batches, ctx.stats.reduce)
        record = {"experts": m, "num_experts": view.num_experts, "groups": groups_of(expert_map),
                  "export": self.config.export, "calib_rel_error": round(error, 6), **extra}
        return LayerResult(block, record)

    def finalize(self, model, records: dict[int, dict]) -> Finalized:
        if self.config.export != "stock":
            return Finalized(export="custom")
        counts = {v.num_experts for v in moe_layer_views(model)}
        if len(counts) == 1:
            set_model_expert_count(model, counts.pop())
            return Finalized(export="stock")
        return Finalized(export="custom")  # per-layer counts: no stock config expresses them (PruningMethod.finalize)
