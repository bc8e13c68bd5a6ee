"""Pruning + least-squares refit: the merge + prune hybrid (our addition; no paper).

Per MoE layer: a registered pruning method (`select`, default NAEE) chooses the M kept experts,
and the block becomes the family's stock block with M experts and the router rows sliced, exactly
as that pruning method gives it. Then the kept experts' down projections are refitted, all of
them jointly, so that the pruned layer reproduces the ORIGINAL layer output on the calibration
tokens under the pruned routing (`methods/down_refit.py` `fit_layer_output`, block Gauss–Seidel):

    min_{W_1..W_M} Σ_t ‖ Σ_{i∈topk'(t)} g'_i(t) (W_i h_i(x_t) + b_i) − Σ_{j∈topk(t)} g_j(t) E_j(x_t) ‖²
                   + λ' Σ_i ‖W_i − W_i^kept‖²

This is MergeMoE's output merging (docs/algorithms.md#mergemoe step 4: absorb other experts' outputs into a down
projection by least squares) with pruning's routing: a pruned expert's tokens go, token by token,
to the experts the router ranks next (not to one fixed cluster centre), and those experts learn
to produce what the pruned expert used to add. The ridge pulls toward the kept expert's own down
projection, so λ → ∞ is plain pruning and the fit only corrects where calibration shows it helps;
this matters when calibration covers one domain and the model is used on others.

Which selector: NAEE (default) is best with calibration that covers the deployment mix; with
one-domain calibration it depends on the model (README, linux-only calibration, 50%: `select=reap`
99.7 vs `select=naee` 108.1 on mixtral-ref and 182.4 vs 194.4 on olmoe-short, but 83.4 vs 78.7 on
qwen3-ref).

Why (measured, README "Merging vs pruning"): with merging's static expert map, tokens of a merged-away
expert always go to its centre; on text absent from calibration that centre is often the wrong
partner, and least-squares merging then loses to pruning. Keeping pruning's token-wise rerouting
and adding the least-squares correction beats both on the reference models. The result is a stock
checkpoint (same class, fewer experts: transformers and vLLM load it).
"""

from __future__ import annotations

import dataclasses

import torch

from ...arch import MoELayerView
from ...ops.routing_weights import dense_routing
from ..base import ConfigError, LayerContext, LayerResult, Requirements, get_method
from ..down_refit import RefitProblem, fit_layer_output
from ..pruning import PruningMethod
from .config import PruneRefitConfig


def pruning_selector(name: str, config: PruneRefitConfig) -> PruningMethod:
    """The registered pruning method `name`, configured with the same ratio/experts."""
    cls = get_method(name)
    if not issubclass(cls, PruningMethod):
        raise ConfigError(f"prune_refit: select must name a pruning method (e.g. naee, frequency, reap); "
                          f"{name!r} is not one")
    return cls(cls.config_class(ratio=config.ratio, experts=config.experts))


def refit_pruned_block(view: MoELayerView, block, batches: list, ridge: float, sweeps: int, reduce=None) -> dict:
    """Refit the down projections of the pruned stock `block` (in place) against `view`'s output."""
    pruned = MoELayerView(block, view.spec, view.config, view.layer_index)
    m = pruned.num_experts
    weights = [dense_routing(*pruned.route(x)[2:], m) for x, _ in batches]
    kept_down = pruned.down_proj.detach().clone()
    problem = RefitProblem(view, batches, weights, intermediate=pruned.intermediate, down=kept_down.clone(),
                           down_bias=pruned.down_bias, solver="ridge" if ridge > 0 else "pinv", ridge=ridge,
                           prior=kept_down if ridge > 0 else None, reduce=reduce)
    fit = fit_layer_output(problem, sweeps=sweeps)
    stored = pruned.expert_format.pack(pruned.gate_proj, pruned.up_proj, problem.down, pruned.gate_bias,
                                       pruned.up_bias, pruned.down_bias)["down_proj"]
    with torch.no_grad():
        block.experts.down_proj.copy_(stored)
    return fit


class PruneRefit(PruningMethod):
    name = "prune_refit"
    summary = "prune (NAEE by default), then refit the kept experts' down projections to the original layer output"
    config_class = PruneRefitConfig

    def __init__(self, config: PruneRefitConfig):
        super().__init__(config)
        self.selector = pruning_selector(config.select, config)

    def requirements(self) -> Requirements:
        return dataclasses.replace(super().requirements(), statistics=tuple(self.selector.needs))

    def choose(self, ctx: LayerContext, m: int) -> tuple[list[int], dict]:
        return self.selector.choose(ctx, m)

    def compress_layer(self, ctx: LayerContext) -> LayerResult:
        result = super().compress_layer(ctx)
        if result.block is not None:
            with torch.no_grad():
                fit = refit_pruned_block(ctx.view, result.block, list(ctx.stats.routed()),
                                         self.config.ridge, int(self.config.sweeps), reduce=ctx.stats.reduce)
            # relative error of the routed output on the calibration tokens: pruned, then after each sweep
            result.record.update(select=self.config.select, refit_tokens=fit["tokens"],
                                 routed_rel_error=fit["rel_error"])
        return result
