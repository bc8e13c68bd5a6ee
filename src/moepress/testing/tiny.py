"""Tiny random-weight configs of every supported family: plumbing for tests, demos and benchmarks.

Random weights prove plumbing, never quality (docs/design.md#evidence).
"""

from __future__ import annotations

import torch
import transformers

from ..arch.model import moe_layer_views

_COMMON = dict(
    vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512, tie_word_embeddings=False,
)

_PER_FAMILY = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=96, num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(
        intermediate_size=128, moe_intermediate_size=48, shared_expert_intermediate_size=64,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(
        intermediate_size=128, moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, head_dim=16)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=48, num_experts=8, num_experts_per_tok=2)),
    "deepseek_v2": ("DeepseekV2Config", dict(
        intermediate_size=128, moe_intermediate_size=48, n_routed_experts=8, num_experts_per_tok=2,
        num_key_value_heads=4, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, topk_method="greedy", n_group=1, topk_group=1)),
    "deepseek_v3": ("DeepseekV3Config", dict(
        intermediate_size=128, moe_intermediate_size=48, n_routed_experts=8, num_experts_per_tok=2,
        num_key_value_heads=4, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_group=2, topk_group=1,
        routed_scaling_factor=2.5, norm_topk_prob=True)),
    "phimoe": ("PhimoeConfig", dict(intermediate_size=96, num_local_experts=8, num_experts_per_tok=2)),
    "gpt_oss": ("GptOssConfig", dict(
        intermediate_size=48, num_local_experts=8, num_experts_per_tok=2, head_dim=16,
        layer_types=None, sliding_window=32)),
}


def tiny_config(family: str, num_layers: int = 2, **overrides):
    """A tiny config of `family` (one extra dense first layer for DeepSeek)."""
    if family not in _PER_FAMILY:
        raise ValueError(f"no tiny config for {family!r}; known: {', '.join(_PER_FAMILY)}")
    cls_name, extra = _PER_FAMILY[family]
    kwargs = {**_COMMON, **extra, "num_hidden_layers": num_layers, **overrides}
    kwargs["num_hidden_layers"] += kwargs.get("first_k_dense_replace", 0)  # dense first layers come extra
    if "layer_types" in kwargs:  # one attention kind per layer, for every layer
        kwargs["layer_types"] = ["full_attention"] * kwargs["num_hidden_layers"]
    return getattr(transformers, cls_name)(**kwargs)


def tiny_model(family: str, seed: int = 0, num_layers: int = 2, dtype=torch.float32, **overrides):
    """A random tiny model of `family` in eval mode; router weights scaled so routing is decisive."""
    config = tiny_config(family, num_layers=num_layers, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    views = moe_layer_views(model)
    experts = {id(p) for v in views for p in v.experts.parameters()}
    routers = {id(v.router.weight) for v in views}
    with torch.no_grad():
        for p in model.parameters():  # model order, so a seed always gives the same model
            if id(p) in experts:
                p.normal_(0.0, 0.1)  # fused experts may be left uninitialised by from_config
            if id(p) in routers:
                p.normal_(0.0, 0.5)
        for v in views:  # selection-only router buffers (DeepSeek-V3's correction bias)
            for name, t in v.router_tensors().items():
                if name != "weight" and not isinstance(t, torch.nn.Parameter):
                    t.copy_(torch.randn_like(t) * 0.05)
    return model.eval()
