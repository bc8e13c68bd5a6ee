"""D²-MoE (Gu et al., ICML 2025; docs/algorithms.md#d2moe): per layer and projection, a shared base merged
with Fisher × frequency weights, per-expert deltas compressed by whitened (truncation-aware) SVD,
and semi-dynamic structured pruning of the base's intermediate channels.

Deviations from the paper/released code, and why:
- Ranks: `ratio_mode="experts"` (default) sets one rank per layer so the layer's stored routed
  parameters are at most `(1 - ratio)` of the original, counting what is really stored (the
  dynamically pruned base channels are stored). `ratio_mode="whole_model"` is the paper's
  convention (`find_delta_ratio`, Table 12).
- Statically pruned channels are removed from the base AND from every expert's deltas (the
  channel disappears from the layer), and the deltas are decomposed on the kept channels only.
- The down-projection whitener is the Gram of the ORIGINAL experts' intermediate activations,
  as in the released code; channel scores `‖X_j‖` use the same statistic summed over experts.
- Expert biases (gpt-oss) are kept exactly per expert rather than decomposed (they are tiny).
- Inference runs the base once per token (Eq. 10), where the released code runs it once per
  selected expert; the result is the same up to rounding.
"""

from __future__ import annotations

import torch

from ...arch import moe_layer_views, parameter_counts
from ...modeling.moepress_delta import DeltaMoeBlock
from ...ops.channel_pruning import channel_scores, rounded_channel_count, static_channel_keep
from ...ops.fisher_merge import fisher_merge, merge_weights_for
from ...ops.rank_allocation import (
    MoELayerShape, find_delta_ratio, rank_for_expert_ratio, rank_from_ratio,
)
from ...ops.whitened_svd import activation_error, cholesky_whitener, shared_v_whitened_svd, whitened_svd
from ..base import ConfigError, LayerContext, LayerResult, Method
from . import stats as _stats  # noqa: F401  (registers the "expert_gram" statistic)
from .config import D2MoEConfig
from .fisher import PROJECTIONS, calibration_ids, fisher_bases


class D2MoE(Method):
    ratio_help = ("fraction of routed-expert parameters removed: the experts become one shared base + low-rank "
                  "deltas sized to store (1 - ratio) of them; every expert stays routable")
    name = "d2moe"
    summary = "shared Fisher-merged base + whitened-SVD low-rank expert deltas + semi-dynamic base pruning"
    config_class = D2MoEConfig
    export = "custom"
    needs = ("frequency", "expert_gram")
    reads_inputs = False  # prepare's Fisher reads token ids and the model, not the layer inputs

    def __init__(self, config: D2MoEConfig):
        super().__init__(config)
        self.fisher: dict | None = None
        self.delta_ratio: float | None = None

    # ------------------------------------------------------------------ model level
    def prepare(self, model, calibration, store=None, stats_cache=None) -> None:
        """Fisher-merged bases (base='fisher', layer by layer through `store`, see fisher.py) and the
        whole-model delta_ratio (ratio_mode='whole_model')."""
        cfg = self.config
        if cfg.base == "fisher":
            ids = calibration_ids(calibration, cfg.fisher_samples)
            self.fisher = self._cached_fisher(model, ids, store, stats_cache)
        if cfg.ratio_mode == "whole_model" and cfg.rank is None:
            self.delta_ratio = self._whole_model_delta_ratio(model)

    def _cached_fisher(self, model, ids, store, cache):
        """`fisher_bases`, read from the statistics cache when this model, these token ids and these
        Fisher options were seen before (keyed by every source weight: cache_keys.weights_digest)."""
        from ... import distributed
        from ...run import cache_keys
        from ...arch import moe_layer_indices
        from . import fisher as fisher_module

        cfg = self.config

        def compute():
            return fisher_bases(model, ids, cfg.fisher_batch_size, store=store,
                                precision=getattr(torch, cfg.fisher_precision))

        if cache is None:
            return compute()
        device = next(model.get_input_embeddings().parameters()).device
        parts = (cache_keys.weights_digest(model, store), cache_keys.tensor_digest(ids),
                 cfg.fisher_batch_size, cfg.fisher_chunk_layers, cfg.fisher_precision, distributed.world_size(),
                 device.type)
        return cache_keys.cached_per_layer(cache, "d2moe_fisher", parts, moe_layer_indices(model), compute,
                                            fisher_module.__file__)

    def _whole_model_delta_ratio(self, model) -> float:
        shapes = [MoELayerShape(v.num_experts, v.hidden_size, v.intermediate_size) for v in moe_layer_views(model)]
        try:
            return find_delta_ratio(float(self.config.ratio), float(self.config.base_prune),
                                    parameter_counts(model)["total"], shapes, self.config.share_v)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    # ------------------------------------------------------------------ one layer
    def _bases(self, ctx: LayerContext, weights: dict, freq: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.config.base == "fisher":
            if self.fisher is None or ctx.view.layer_index not in self.fisher:
                raise ConfigError("base='fisher' needs Method.prepare(model, calibration) to estimate Fisher first")
            device = weights["gate"].device
            return {p: self.fisher[ctx.view.layer_index][p].double().to(device) for p in PROJECTIONS}
        fisher, frequency = merge_weights_for(self.config.base, None, freq)
        return {p: fisher_merge(weights[p], fisher, frequency) for p in PROJECTIONS}

    def _channels(self, width: int, bases: dict, gram_mid: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Static channel selection (Eq. 9 on calibration statistics) and the dynamic count.

        The static count is rounded for aligned widths (`rounded_channel_count`); the dynamic
        count (masked per batch, so free of alignment needs) absorbs the rounding so the total is
        `round(width · base_prune)` whenever possible.
        """
        cfg = self.config
        n_static, multiple = rounded_channel_count(width, cfg.base_prune * cfg.static_share, cfg.channel_multiple)
        total = max(int(round(width * cfg.base_prune)), n_static)
        n_dynamic = max(0, min(total - n_static, width - n_static - 1))
        act_sq = torch.diagonal(gram_mid, dim1=-2, dim2=-1).sum(0)
        keep = static_channel_keep(channel_scores(bases["down"], act_sq), n_static)
        info = {"static_pruned": n_static, "dynamic_pruned": n_dynamic, "channel_multiple": multiple,
                "requested_base_prune": cfg.base_prune,
                "actual_base_prune": (n_static + n_dynamic) / width}
        return keep, info

    def _rank(self, ctx: LayerContext, kept: int, bias_params: int) -> int:
        cfg, v = self.config, ctx.view
        if cfg.rank is not None:
            return int(cfg.rank)
        if cfg.ratio_mode == "whole_model":
            if self.delta_ratio is None:
                if ctx.model is None:
                    raise ConfigError("ratio_mode='whole_model' needs the model (prepare or LayerContext.model)")
                self.delta_ratio = self._whole_model_delta_ratio(ctx.model)
            return rank_from_ratio(v.hidden_size, v.intermediate_size, self.delta_ratio)
        shape = MoELayerShape(v.num_experts, v.hidden_size, v.intermediate_size)
        try:
            rank = rank_for_expert_ratio(float(cfg.ratio), shape, kept, cfg.share_v, bias_params,
                                         v.num_experts * v.parameters_per_expert)
        except ValueError as exc:
            raise ConfigError(f"layer {v.layer_index}: {exc}") from None
        m = int(cfg.rank_multiple)
        # aligned rows for the grouped kernels, only where that costs under ~3% of the delta budget
        return rank - rank % m if rank >= 32 * m else rank

    def _decompose(self, deltas, grams, freq, rank):
        """Whitened SVD of `deltas [E, out, in]` with per-expert Grams `[E, in, in]` -> (U, V, rel_err)."""
        if self.config.share_v:
            w = freq / freq.sum() if freq.sum() > 0 else torch.full_like(freq, 1 / len(freq))
            gram = torch.einsum("e,eij->ij", w, grams)
            u, v = shared_v_whitened_svd(deltas, cholesky_whitener(gram), rank)
            vs = v.unsqueeze(0).expand(deltas.shape[0], -1, -1)
        else:
            pairs = [whitened_svd(d, cholesky_whitener(g), rank) for d, g in zip(deltas, grams)]
            u = torch.stack([p[0] for p in pairs])
            vs = v = torch.stack([p[1] for p in pairs])
        err = sum(float(activation_error(d, a @ b, g)) for d, a, b, g in zip(deltas, u, vs, grams))
        ref = sum(float(activation_error(d, torch.zeros_like(d), g)) for d, g in zip(deltas, grams))
        return u, (v.unsqueeze(0) if self.config.share_v else v), err / max(ref, 1e-300)

    def compress_layer(self, ctx: LayerContext) -> LayerResult:
        view, cfg = ctx.view, self.config
        freq = ctx.stats["frequency"].double()
        grams = ctx.stats["expert_gram"]
        weights = {p: getattr(view, f"{p}_proj").detach().double() for p in PROJECTIONS}  # on the layer's device
        bases = self._bases(ctx, weights, freq)
        keep, channel_info = self._channels(view.intermediate_size, bases, grams["intermediate"])
        weights = {"gate": weights["gate"][:, keep], "up": weights["up"][:, keep], "down": weights["down"][:, :, keep]}
        bases = {"gate": bases["gate"][keep], "up": bases["up"][keep], "down": bases["down"][:, keep]}
        gram_in, gram_mid = grams["input"], grams["intermediate"][:, keep][:, :, keep]
        kept = len(keep)
        rank = self._rank(ctx, kept, _bias_count(view, kept))
        factors, errors, ranks = {}, {}, {}
        for p in PROJECTIONS:
            out_f, in_f = weights[p].shape[1:]
            ranks[p] = min(rank, in_f, out_f * (view.num_experts if cfg.share_v else 1))
            u, v, errors[p] = self._decompose(weights[p] - bases[p], gram_mid if p == "down" else gram_in, freq, ranks[p])
            factors[p] = (u, v)
        block = self._build_block(view, kept, ranks, channel_info["dynamic_pruned"], bases, factors, keep)
        stored, active, _ = block.moepress_parameter_counts()
        original = view.num_experts * view.parameters_per_expert  # biases included (gpt-oss)
        record = {
            "base": cfg.base, "ranks": ranks, "intermediate_kept": kept, **channel_info,
            "relative_activation_error": errors, "routed_parameters_before": original,
            "routed_parameters_after": stored, "routed_active_after": active,
            "achieved_ratio": 1 - stored / original, "tokens": ctx.stats.num_tokens,
        }
        if cfg.ratio_mode == "whole_model" and cfg.rank is None:
            record["delta_ratio"] = self.delta_ratio
        return LayerResult(block, record)

    def _build_block(self, view, kept, ranks, dynamic, bases, factors, keep) -> DeltaMoeBlock:
        block = DeltaMoeBlock(view.block, view.config, num_experts=view.num_experts, intermediate=kept,
                              ranks=ranks, share_v=self.config.share_v, dynamic_channels=dynamic,
                              original_intermediate=view.intermediate_size, dynamic_scope=self.config.dynamic_scope)
        biases = None
        if view.gate_bias is not None:
            biases = {"gate": view.gate_bias[:, keep], "up": view.up_bias[:, keep], "down": view.down_bias}
        block.set_factors({p: t.to(block.base_down.dtype) for p, t in bases.items()},
                          {p: (u.to(block.base_down.dtype), v.to(block.base_down.dtype)) for p, (u, v) in factors.items()},
                          biases)
        return block


def _bias_count(view, kept: int | None) -> int:
    """Per-expert bias parameters stored (gpt-oss), with `kept` intermediate channels (None = all)."""
    if view.gate_bias is None:
        return 0
    width = view.intermediate_size if kept is None else kept
    return view.num_experts * (2 * width + view.hidden_size)
