"""Compressed Experts (He et al. 2025): fewer activated experts per token + compressed stand-ins.

The paper's method (`--opt aux_width=none`) fits nothing, so no calibration text, tokenizer or
statistic is needed: every MoE block is wrapped in a `CompressedExpertsBlock` whose vectors start
at one (= top-`k_main` routing) and are learned afterwards with `moepress finetune` (`finetune.py`
beside this file); the paper trains them with full SFT (§3.1).

Default (issue 23): `aux_width=auto`, the mini-experts below at width I/8, fitted here on the
calibration text. They are what holds out of domain (README, "Compressed Experts"); the paper's
block stays available unchanged and the record's config says which ran (`aux_width`).

`aux_width=R` (our addition, not the paper's) also gives every expert a width-R mini-expert that
stands in for it when it is auxiliary (`moepress.modeling.moepress_compressed`). It is fitted here,
before any training, on the calibration tokens where the expert is auxiliary (rank > k_main among
the token's top-k), each token weighted by the expert's routing weight a_j(t), the weight the
mini-expert's output receives in the block (`fit_auxiliary`):
1. keep the R neurons of largest `sum_t a_j(t) h_n(x_t)^2 * ||W_D[:, n]||^2` (each neuron's share
   of the weighted output energy, as the routing weight sees it);
2. refit their down columns and an output bias by weighted least squares against the full expert's
   output, `min_{D,b} sum_t a_j(t) ||E_j(x_t) - D h_S(x_t) - b||^2`, ridge `aux_ridge` toward the
   neurons' own down columns and the expert's down bias (so an expert seen on few tokens stays
   the plain truncation).
Why: the paper's vectors only rescale the main experts' inputs and intermediates, so the output
of the auxiliary experts is lost (measured: CE fine-tuning recovers ~20-30% of the top-k/2 gap on
`olmoe-wide`); a few of each expert's own neurons carry most of that output. With R = I the fit is
exact and the block is the stock top-k block (tested).

Out of domain (issue 23, `benchmarks/ce_out_of_domain.py`, mixtral-ref calibrated on Linux docs
only): `aux_ridge=0.1` (the default; was 1e-3) recovers more of the gap on the five other domains
than a near-unregularised fit, which bends the kept neurons' down columns to the calibration
domain. Measured and kept as options, not defaults (both lost out of domain): `aux_fit=routed|all`
(fit on every top-k token, or on all tokens weighted by router score) and `aux_bias=False`.
Fine-tuning the fit: the default `finetune` recipe `distill` (finetune.py).
"""

from __future__ import annotations

import dataclasses

import torch

from ...arch import MoELayerView
from ...modeling.moepress_compressed import CompressedExpertsBlock, split_main_auxiliary
from ...ops.least_squares import NormalEquations
from ..base import ConfigError, LayerContext, LayerResult, Method, Requirements
from .config import CompressedExpertsConfig


def auxiliary_tokens(aux_w: torch.Tensor, aux_i: torch.Tensor, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the tokens where `expert` is auxiliary, and its routing weight there."""
    hit = aux_i == expert
    rows = torch.nonzero(hit.any(dim=-1)).flatten()
    return rows, (aux_w * hit).sum(dim=-1)[rows]


def fit_rows(mode: str, routing, aux: tuple[torch.Tensor, torch.Tensor], expert: int):
    """Rows a mini-expert is fitted on and their weights: `auxiliary` (where the expert is auxiliary,
    its routing weight), `routed` (where it is in the top-k at any rank, its routing weight), or
    `all` (every token, the router's score of the expert)."""
    if mode == "auxiliary":
        return auxiliary_tokens(*aux, expert)
    if mode == "routed":
        return auxiliary_tokens(routing.weights, routing.index, expert)
    score = routing.scores[:, expert]
    rows = torch.nonzero(score > 0).flatten()
    return rows, score[rows]


def fit_auxiliary(view: MoELayerView, batches: list, k_main: int, width: int, ridge: float, reduce,
                  mode: str = "auxiliary", fit_bias: bool = True) -> dict:
    """Fit each expert's width-`width` mini-expert (module doc, steps 1-2). Returns the block's
    `aux_*` tensors (view convention) and `tokens`, per expert the calibration tokens it was fitted on.

    Every rank of a data-parallel run calls `reduce` on the same values in the same order (the
    neuron energies, then every expert's normal equations, empty ones included)."""
    n, h = view.num_experts, view.hidden_size
    down, down_bias = view.down_proj, view.down_bias
    gate, up = view.gate_proj, view.up_proj
    device = batches[0][0].device if batches else gate.device
    split = [split_main_auxiliary(r.weights, r.index, k_main)[2:] for _, r in batches]  # (aux_w, aux_i), as the block
    energy = torch.zeros(n, view.intermediate_size, dtype=torch.float64, device=device)
    for (x, r), aux in zip(batches, split):
        for j in range(n):
            rows, a = fit_rows(mode, r, aux, j)
            if rows.numel():
                act = view.intermediate(j, x.index_select(0, rows)).double()
                energy[j] += (a.double().unsqueeze(-1) * act.pow(2)).sum(0)
    energy = reduce(energy)
    down64 = down.double().to(device)
    score = energy * down64.pow(2).sum(dim=1)  # [N, I]: weighted output energy per neuron (down [N, H, I])
    unseen = energy.sum(dim=-1) == 0  # never auxiliary on this text: rank by weight norms instead
    if unseen.any():
        norms = (gate.double().to(device).norm(dim=-1) * up.double().to(device).norm(dim=-1)
                 * down64.pow(2).sum(dim=1))
        score[unseen] = norms[unseen]
    keep = score.argsort(dim=-1, descending=True, stable=True)[:, :width].to(gate.device)  # [N, R]
    bias = down_bias if down_bias is not None else down.new_zeros(n, h)
    prior = torch.stack([torch.cat([down[j][:, keep[j]], bias[j].unsqueeze(-1)], dim=-1) for j in range(n)])
    equations = [NormalEquations(width + 1, h) for _ in range(n)]
    for (x, r), aux in zip(batches, split):
        for j in range(n):
            rows, a = fit_rows(mode, r, aux, j)
            if rows.numel():
                xj = x.index_select(0, rows)
                h_full = view.intermediate(j, xj)  # once: the features and the target E_j(x) (= view.expert)
                stored = view.expert_format.stored_expert(view.experts, j)
                target = view.expert_format.output(h_full, stored["down"], stored.get("down_bias"))
                features = torch.cat([h_full[:, keep[j]], xj.new_ones(len(rows), 1) * float(fit_bias)], dim=-1)
                root = a.sqrt().unsqueeze(-1).to(xj.dtype)
                equations[j].add(root * features, root * target)
    aux_down, aux_bias, tokens = [], [], []
    for j in range(n):
        eq = reduce(equations[j])
        tokens.append(int(eq.tokens))
        fitted = eq.solve("ridge", ridge, prior[j]) if eq.tokens else prior[j].double()
        if not fit_bias:
            fitted[:, width] = prior[j][:, width]
        aux_down.append(fitted[:, :width])
        aux_bias.append(fitted[:, width])
    out = {
        "aux_gate_up": torch.stack([torch.cat([gate[j][keep[j]], up[j][keep[j]]]) for j in range(n)]),
        "aux_down": torch.stack(aux_down), "aux_bias": torch.stack(aux_bias), "tokens": tokens,
    }
    if view.gate_bias is not None:
        out["aux_gate_up_bias"] = torch.stack([torch.cat([view.gate_bias[j][keep[j]], view.up_bias[j][keep[j]]])
                                               for j in range(n)])
    return out


class CompressedExperts(Method):
    ratio_help = ("fraction of each token's activated experts replaced by compressed stand-ins (top-k -> "
                  "k_main main experts + k - k_main compressed), so fewer active parameters per token; every "
                  "expert stays stored, and each also stores its width-R mini-expert (none with --opt aux_width=none)")
    name = "compressed_experts"
    summary = ("replace the lower-weighted activated experts of each token by compressed stand-ins: fitted "
               "mini-experts (default) or the paper's learned vectors (aux_width=none, needs finetune)")
    config_class = CompressedExpertsConfig
    export = "custom"
    needs = ()
    needs_calibration = False
    next_step = ("the compressed vectors start at one (plain top-k_main routing): learn them with "
                 "`moepress finetune {path}` before judging quality")

    def requirements(self) -> Requirements:
        if self.config.aux_width is None:
            return super().requirements()
        # the mini-experts are fitted on calibration text
        return dataclasses.replace(super().requirements(), calibration=True, next_step=(
            "the mini-experts are fitted and already stand in for the auxiliary experts; the vectors start at "
            "one: `moepress finetune {path}` learns them (optional)"))

    def compress_layer(self, ctx: LayerContext) -> LayerResult:
        view = ctx.view
        if view.top_k < 2:
            raise ConfigError(
                f"compressed_experts needs a model routing each token to top-k >= 2 experts; "
                f"layer {view.layer_index} routes to top-{view.top_k}"
            )
        k_main = self.config.resolve_k_main(view.top_k)
        aux_width = self.config.resolve_aux_width(view.intermediate_size)
        if aux_width is not None and aux_width > view.intermediate_size:
            raise ConfigError(f"aux_width={aux_width} is wider than the experts ({view.intermediate_size})")
        fitted = None
        if aux_width is not None and k_main < view.top_k:
            fitted = fit_auxiliary(view, list(ctx.stats.routed()), k_main, aux_width,
                                   float(self.config.aux_ridge), ctx.stats.reduce, self.config.aux_fit,
                                   self.config.aux_bias)
        block = CompressedExpertsBlock(view.block, view.config, k_main=k_main, aux_width=aux_width)
        if fitted is not None:
            with torch.no_grad():
                for name, value in fitted.items():
                    if name != "tokens":
                        getattr(block, name).copy_(value.to(getattr(block, name).dtype))
        stored, active, experts = block.moepress_parameter_counts()
        record = {
            "k_main": k_main, "n_ce": view.top_k - k_main, "top_k": view.top_k,
            "routed_parameters_stored": stored, "routed_parameters_active": active,
        }
        if fitted is not None:
            record["aux_width"] = int(aux_width)
            record["aux_fit_tokens"] = fitted["tokens"]
        return LayerResult(block=block, record=record)
