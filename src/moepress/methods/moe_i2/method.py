"""MoE-I² (Yang et al. 2024, arXiv 2411.01016; docs/algorithms.md#moe_i2): inter-expert pruning with
non-uniform per-layer counts, then intra-expert low-rank decomposition of the surviving experts.

1. Stage 1, which experts: every expert's importance is the layer-output error of removing it
   alone (router rows sliced), measured on the uncompressed model (`prepare`, one forward pass).
   The experts to prune over the whole model, `round(expert_share · ratio · Σ N_l)`, are shared
   among layers so that the summed importance of what is pruned is smallest (ops/expert_allocation.py):
   layers whose experts matter less lose more. In each layer the subset to keep is then searched
   to minimise `Σ‖MoE(x) − MoE_S(x)‖²` on the layer's calibration inputs.
2. Stage 2, low rank: each kept expert's gate, up and down become `U V` by truncation-aware SVD
   whitened with the Gram of the tokens the pruned router sends that expert (SVD-LLM, ops/whitened_svd.py).
   Ranks: the layer may keep `q = (1 − ratio)/(1 − p')` of its kept experts' parameters (p' = the
   fraction of experts stage 1 removed, ops/low_rank.py); that rank budget is shared among its
   experts in proportion to their importance within the kept set (one rank per expert for gate,
   up and down), none above `H·I/(H+I)` where the factors would outweigh the dense expert (the
   `rank` option overrides all this). The checkpoint ships the LowRankMoeBlock
   (modeling/moepress_lowrank.py) via auto_map.

Deviations from the paper, and why:
- The paper's text was not available to us beyond its abstract (docs/algorithms.md#moe_i2 says
  so), so the split of the ratio between the stages
  (`expert_share`, default 0.5), the allocation of per-layer counts from importance, and the rank
  allocation above are moepress's reading of "layer-importance-aware non-uniform pruning" and
  "importance-based rank allocation", not a verified transcription.
- The per-layer search enumerates every subset when there are at most `max_subsets` (the optimum
  the paper's Layer-wise Genetic Search approximates), else greedy backward elimination; the
  Block-wise KT-Reception Field (scoring candidate subsets over the following blocks) is not done:
  each layer is scored on its own output, with inputs propagated through the compressed earlier layers.
- With `layer_allocation="uniform"` no model-level pass is needed and every layer prunes the same count.
- Stage 3 of the paper (LoRA fine-tuning) is not part of this one-shot method.
"""

from __future__ import annotations

import dataclasses

import torch

from ...arch import MoELayerView, moe_layer_views, validate_expert_count
from ...modeling.moepress_lowrank import PROJECTIONS, LowRankMoeBlock
from ...ops.expert_allocation import allocate_pruned_experts, uniform_pruned_experts
from ...ops.low_rank import (kept_parameter_fraction, layer_rank_budget, low_rank_parameters, proportional_ranks,
                             stage_split)
from ...ops.saliency import naee_search
from ...ops.whitened_svd import activation_error, cholesky_whitener, whitened_svd
from ..base import ConfigError, LayerContext, LayerResult, Method, Requirements
from ..merging_common import layer_relative_error
from .config import MoEI2Config
from .layer_stats import SubsetLoss, removal_importance, routed_grams


def allowed_prune_counts(view: MoELayerView) -> list[int]:
    """Prune counts whose survivors the layer's routing accepts (>= top-k, DeepSeek group sizes)."""
    out = []
    for k in range(view.num_experts):
        try:
            validate_expert_count(view.config, view.num_experts - k)
            out.append(k)
        except ValueError:
            pass
    return out


class MoEI2(Method):
    ratio_help = ("fraction of routed-expert parameters removed, by pruning experts and factoring the kept ones "
                  "into low-rank pairs")
    name = "moe_i2"
    summary = "MoE-I2: importance-aware non-uniform expert pruning + per-expert low-rank (whitened SVD)"
    config_class = MoEI2Config
    export = "custom"

    def __init__(self, config: MoEI2Config):
        super().__init__(config)
        self.kept_counts: dict[int, int] | None = None
        self.keep_fraction: float | None = None
        self.layer_importance: dict[int, list[float]] = {}

    # ------------------------------------------------------------------ model level: stage-1 counts
    def requirements(self) -> Requirements:
        # the importance pass hooks every MoE layer of the resident model at once, and its counts
        # span all MoE layers (no --layers)
        importance = self.config.layer_allocation == "importance"
        return dataclasses.replace(super().requirements(), resident_model=importance, layer_subset=not importance)

    def prepare(self, model, calibration, store=None, stats_cache=None) -> None:
        cfg = self.config
        if cfg.layer_allocation != "importance":
            return
        views = moe_layer_views(model)
        ids = getattr(calibration, "input_ids", calibration)
        importance = removal_importance(model, views, ids.split(8), cfg.max_tokens)
        allowed = [allowed_prune_counts(v) for v in views]
        sizes = [v.num_experts for v in views]
        target = round(stage_split(float(cfg.ratio), float(cfg.expert_share)) * sum(sizes))
        counts = allocate_pruned_experts([importance[v.layer_index] for v in views], allowed, target)
        self.kept_counts = {v.layer_index: n - k for v, n, k in zip(views, sizes, counts)}
        self.keep_fraction = kept_parameter_fraction(float(cfg.ratio), sum(counts) / sum(sizes))
        self.layer_importance = {i: [round(float(s), 8) for s in t] for i, t in importance.items()}

    def plan(self, view: MoELayerView) -> tuple[int, float]:
        """(experts kept, stage-2 parameter fraction) for this layer."""
        if self.config.layer_allocation == "importance":
            if self.kept_counts is None:
                raise ConfigError("layer_allocation='importance' needs Method.prepare(model, calibration) first")
            return self.kept_counts[view.layer_index], float(self.keep_fraction)
        p = stage_split(float(self.config.ratio), float(self.config.expert_share))
        k = uniform_pruned_experts([view.num_experts], [allowed_prune_counts(view)], p)[0]
        return view.num_experts - k, kept_parameter_fraction(float(self.config.ratio), k / view.num_experts)

    # ------------------------------------------------------------------ one layer
    def choose_experts(self, view: MoELayerView, loss: SubsetLoss, m: int) -> tuple[list[int], dict]:
        if m == view.num_experts:
            return list(range(m)), {"search": "none", "subsets_evaluated": 0}
        keep, search, evaluations = naee_search(view.num_experts, m, loss.squared_error, self.config.max_subsets)
        return keep, {"search": search, "subsets_evaluated": evaluations,
                      "search_rel_loss": loss.squared_error(keep) / max(loss.energy, 1e-300)}

    def expert_ranks(self, view: MoELayerView, loss: SubsetLoss, keep: list[int], keep_fraction: float):
        """Per kept expert the rank of its three projections, and the importances used."""
        h, i = view.hidden_size, view.intermediate_size
        if self.config.rank is not None:
            return [min(int(self.config.rank), h, i)] * len(keep), None
        # above H·I/(H+I) the factors would store more than the dense expert: spend that elsewhere
        cap = max(1, min(h, i, (h * i) // (h + i)))
        base = loss.squared_error(keep)
        importance = (loss.removal_errors(keep) - base).clamp_min(0)
        use = self.config.rank_allocation == "importance" and bool(torch.isfinite(importance).all())
        weights = importance.tolist() if use else [1.0] * len(keep)
        dense = view.parameters_per_expert - 3 * h * i  # the biases, which the factors leave dense
        budget = layer_rank_budget(view.parameters_per_expert, low_rank_parameters(h, i, 1), len(keep),
                                   keep_fraction, dense)
        return proportional_ranks(weights, budget, cap), (importance.tolist() if use else None)

    def decompose(self, pruned: MoELayerView, batches, ranks: list[int], reduce=None) -> tuple[dict, dict]:
        """Whitened SVD factors `{proj: [(U, V)] per expert}` and each projection's relative error
        (Grams summed over data-parallel ranks by `reduce`)."""
        grams = routed_grams(pruned, batches) if reduce is None else routed_grams(pruned, batches, reduce)
        factors, errors = {p: [] for p in PROJECTIONS}, {}
        for p in PROJECTIONS:
            weights = getattr(pruned, f"{p}_proj").detach()
            gram_all = grams["intermediate" if p == "down" else "input"]
            err = ref = 0.0
            for e, r in enumerate(ranks):
                w, gram = weights[e].double().cpu(), gram_all[e]
                whitener = cholesky_whitener(gram) if self.config.whiten else None
                u, v = whitened_svd(w, whitener, r)
                factors[p].append((u.to(weights.dtype), v.to(weights.dtype)))
                err += float(activation_error(w, u @ v, gram))
                ref += float(activation_error(w, torch.zeros_like(w), gram))
            errors[p] = err / max(ref, 1e-300)
        return factors, errors

    def compress_layer(self, ctx: LayerContext) -> LayerResult:
        view, cfg = ctx.view, self.config
        dense = view.num_experts * view.parameters_per_expert  # biases included (gpt-oss)
        if float(cfg.ratio) == 0.0 and cfg.rank is None:
            return LayerResult(None, {"experts": view.num_experts, "routed_parameters_before": dense,
                                      "routed_parameters_after": dense, "achieved_ratio": 0.0})
        m, keep_fraction = self.plan(view)
        with torch.no_grad():
            stats = ctx.stats  # data parallel: this rank's tokens among the first max_tokens (as NAEE)
            local = max(0, min(stats.local_tokens, cfg.max_tokens - stats.token_offset))
            x = torch.cat(stats.batches)[:local] if stats.batches else torch.zeros(0, view.hidden_size)
            loss = SubsetLoss(view, x, stats.reduce)
            keep, search = self.choose_experts(view, loss, m)
            ranks, importance = self.expert_ranks(view, loss, keep, keep_fraction)
            stock = view.select(keep)
            pruned = MoELayerView(stock, view.spec, view.config, view.layer_index)
            factors, errors = self.decompose(pruned, stats.batches, ranks, stats.reduce)
            block = LowRankMoeBlock(stock, view.config, num_experts=m, intermediate=view.intermediate_size,
                                    ranks={p: ranks for p in PROJECTIONS})
            biases = None if pruned.gate_bias is None else {
                p: getattr(pruned, f"{p}_bias").detach() for p in PROJECTIONS}
            block.set_factors(factors, biases)
            error = layer_relative_error(view, block, stats.batches, stats.reduce)
        stored = block.moepress_parameter_counts()[0]
        record = {"experts": m, "num_experts": view.num_experts, "kept": keep, **search, "ranks": ranks,
                  "stage2_keep_fraction": round(keep_fraction, 6), "expert_importance": importance,
                  "removal_importance": self.layer_importance.get(view.layer_index),
                  "relative_activation_error": errors, "calib_rel_error": round(error, 6),
                  "routed_parameters_before": dense, "routed_parameters_after": stored,
                  "achieved_ratio": 1 - stored / dense}
        return LayerResult(block, record)
