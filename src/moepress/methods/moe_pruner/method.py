"""MoE-Pruner (Xie et al. 2024, arXiv 2410.12013; docs/algorithms.md#moe_pruner): one-shot pruning of expert
weights scored by magnitude × router-weighted input activation norm (ops/moe_pruner.py).

Every routed expert keeps its shape; the lowest-scoring weights of each output row are set to zero
(`pattern="unstructured"`) or the N:M pattern is imposed (`pattern="2:4"`). The result is the
family's stock block with zeros in it: the checkpoint loads in plain transformers/vLLM, and stores
(and computes) as much as before unless a sparse kernel is used. `--ratio` is the fraction of
routed-expert weights zeroed; each layer record reports `routed_nonzero`, the non-zeros stored.

Scope and deviations, and why:
- Only routed experts are pruned (gate, up, down weights; biases stay dense), because `--ratio` is
  defined over routed-expert parameters (docs/design.md#ratio). Attention, routers and shared experts are
  left dense.
- Statistics: gate and up score their input x, down scores the expert's intermediate activation
  h(x), all from the unpruned layer on the tokens routed to the expert, each token weighted by the
  model's own routing weight for that expert (after any top-k renormalisation). Inputs propagate
  through the already-pruned earlier layers (as Wanda's sequential layer loop).
- An expert that receives no calibration token has no activation statistic; it is pruned by
  weight magnitude alone (every input column weighted equally) rather than arbitrarily.
- The expert-wise knowledge distillation the paper applies after pruning is not part of this
  one-shot method.
"""

from __future__ import annotations

import torch

from ...calib.stats import LayerStatistics, statistic
from ...ops.moe_pruner import moe_pruner_scores, n_m_mask, unstructured_row_mask
from ..base import ConfigError, LayerContext, LayerResult, Method
from .config import MoEPrunerConfig


@statistic("gated_input_sq")
def gated_input_sq(stats: LayerStatistics) -> dict[str, torch.Tensor]:
    """Per expert j, over tokens routed to j with routing weight g: `Σ g² x²` `[E, H]` ("input"),
    `Σ g² h_j(x)²` `[E, I]` ("intermediate") and the routed-token count `[E]` ("tokens"), float64."""
    view = stats.view
    e = view.num_experts
    sq_in = torch.zeros(e, view.hidden_size, dtype=torch.float64)
    sq_mid = torch.zeros(e, view.intermediate_size, dtype=torch.float64)
    tokens = torch.zeros(e, dtype=torch.float64)
    with torch.no_grad():
        for x, routing in stats.routed():
            for j in routing.index.unique().tolist():
                tok, slot = (routing.index == j).nonzero(as_tuple=True)
                g = routing.weights[tok, slot].double()[:, None]
                xj = x[tok]
                sq_in[j] += ((xj.double() * g) ** 2).sum(0).cpu()
                sq_mid[j] += ((view.intermediate(j, xj).double() * g) ** 2).sum(0).cpu()
                tokens[j] += tok.numel()
    return {"input": sq_in, "intermediate": sq_mid, "tokens": tokens}


class MoEPruner(Method):
    ratio_help = ("fraction of routed-expert weights set to zero (every expert stays; the tensors keep their "
                  "shape, the non-zeros are recorded)")
    name = "moe_pruner"
    summary = "MoE-Pruner: zero expert weights by |W| x router-weighted input norm (unstructured or 2:4); stock"
    config_class = MoEPrunerConfig
    export = "stock"
    needs = ("gated_input_sq",)
    reads_inputs = False

    def keep_mask(self, weight: torch.Tensor, gated_sq: torch.Tensor, routed_tokens: float) -> torch.Tensor:
        """Boolean keep-mask `[out, in]` of one expert projection."""
        if routed_tokens <= 0:
            gated_sq = torch.ones_like(gated_sq)
        scores = moe_pruner_scores(weight, gated_sq)
        nm = self.config.n_m
        if nm is None:
            return unstructured_row_mask(scores, float(self.config.ratio))
        try:
            return n_m_mask(scores, *nm)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def compress_layer(self, ctx: LayerContext) -> LayerResult:
        view, sq = ctx.view, ctx.stats["gated_input_sq"]
        projections = {"gate": (view.gate_proj, sq["input"]), "up": (view.up_proj, sq["input"]),
                       "down": (view.down_proj, sq["intermediate"])}
        pruned, new = 0, {}
        with torch.no_grad():
            for name, (weight, gated) in projections.items():
                w = weight.detach()
                masks = torch.stack([self.keep_mask(w[j], gated[j], float(sq["tokens"][j]))
                                     for j in range(view.num_experts)]).to(w.device)
                pruned += int((~masks).sum())
                new[name] = w * masks
        biases = {} if view.gate_bias is None else {
            "gate_bias": view.gate_bias.detach(), "up_bias": view.up_bias.detach(), "down_bias": view.down_bias.detach()}
        weights_total = sum(t.numel() for t in new.values())
        record = {
            "pattern": self.config.pattern, "requested_sparsity": float(self.config.ratio),
            "pruned_weights": pruned, "achieved_sparsity": pruned / weights_total,
            "routed_parameters": weights_total + sum(b.numel() for b in biases.values()),
            "routed_nonzero": sum(int(torch.count_nonzero(t)) for t in (*new.values(), *biases.values())),
            "unrouted_experts": [j for j in range(view.num_experts) if float(sq["tokens"][j]) <= 0],
        }
        if pruned == 0:
            return LayerResult(None, record)
        router = {k: v.detach() for k, v in view.router_tensors().items()}
        return LayerResult(view.rebuild(new["gate"], new["up"], new["down"], router, **biases), record)
