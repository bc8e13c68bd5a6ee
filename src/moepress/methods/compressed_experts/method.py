"""Compressed Experts (He et al. 2025): fewer activated experts per token + learned vectors.

Nothing is fitted here, so no calibration text, tokenizer or statistic is needed
(`needs_calibration = False`): every MoE block is wrapped in a `CompressedExpertsBlock` whose
vectors start at one (= top-`k_main` routing). The vectors are learned afterwards with
`moepress finetune` (`finetune.py` beside this file); the paper trains them with full SFT (§3.1).
"""

from __future__ import annotations

from ...modeling.moepress_compressed import CompressedExpertsBlock
from ..base import ConfigError, LayerContext, LayerResult, Method
from .config import CompressedExpertsConfig


class CompressedExperts(Method):
    name = "compressed_experts"
    summary = "replace the lower-weighted activated experts of each token by learned compressed vectors (needs finetune)"
    config_class = CompressedExpertsConfig
    export = "custom"
    needs = ()
    needs_calibration = False

    def compress_layer(self, ctx: LayerContext) -> LayerResult:
        view = ctx.view
        if view.top_k < 2:
            raise ConfigError(
                f"compressed_experts needs a model routing each token to top-k >= 2 experts; "
                f"layer {view.layer_index} routes to top-{view.top_k}"
            )
        k_main = self.config.resolve_k_main(view.top_k)
        block = CompressedExpertsBlock(view.block, view.config, k_main=k_main)
        stored, active, experts = block.moepress_parameter_counts()
        record = {
            "k_main": k_main, "n_ce": view.top_k - k_main, "top_k": view.top_k,
            "routed_parameters_stored": stored, "routed_parameters_active": active,
        }
        return LayerResult(block=block, record=record)
