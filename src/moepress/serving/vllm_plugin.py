"""vLLM plugin: registers a vLLM model for every architecture a moepress checkpoint names.

vLLM calls `register()` in every process it starts (entry-point group `vllm.general_plugins`,
declared in pyproject.toml), so `vllm serve OUT` and `LLM(OUT)` find `MoepressMixtralForCausalLM`
& co. Registration is by "module:Class" string: vLLM imports `moepress.serving.vllm_models` only
when such a checkpoint is loaded.
"""

from __future__ import annotations

# family model_type -> (vLLM module under vllm.model_executor.models, vLLM class). Every family of
# moepress's table has one; which of them vLLM's CPU backend runs is in the README ("Serve").
VLLM_BASES = {
    "mixtral": ("mixtral", "MixtralForCausalLM"),
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "olmoe": ("olmoe", "OlmoeForCausalLM"),
    "deepseek_v2": ("deepseek_v2", "DeepseekV2ForCausalLM"),
    "deepseek_v3": ("deepseek_v2", "DeepseekV3ForCausalLM"),
    "phimoe": ("phimoe", "PhiMoEForCausalLM"),
    "gpt_oss": ("gpt_oss", "GptOssForCausalLM"),
}


def architectures() -> dict[str, str]:
    """`{moepress architecture: "module:Class"}` of every vLLM model this plugin provides."""
    from ..modeling.moepress_family import FAMILY_FACTS

    return {f"Moepress{family.causal_lm_class}": f"moepress.serving.vllm_models:Moepress{family.causal_lm_class}"
            for family in FAMILY_FACTS.values() if family.model_type in VLLM_BASES}


def register() -> None:
    """Entry point: register every moepress architecture with vLLM's model registry."""
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in architectures().items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
