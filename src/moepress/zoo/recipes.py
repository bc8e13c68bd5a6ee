"""Deterministic training recipes of the reference models.

Step counts are fixed (not wall-clock budgets) so a rerun with the same seed reproduces the
same weights (on the same thread count: float reductions differ across thread counts). The small
ones are 800-900 steps of 16 x 256 tokens: ~10-12 minutes on 2 idle cores (0.65-0.95 s/step
measured), 32 minutes for mixtral-ref on our shared 2-core machine at load ~9. The two stronger
ones (qwen3-ref, olmoe-wide: hidden 256, 8 layers, ~22 M parameters) are 1000 steps at 1.6-2.4
s/step on 2 idle cores: 30-40 minutes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .tokenizer import VOCAB_SIZE


@dataclass(frozen=True)
class TrainRecipe:
    name: str
    config_class: str  # a transformers config class name
    config: dict
    steps: int
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 1234
    #: "aux_loss": the model's own load-balancing loss (router_aux_loss_coef);
    #: "bias": DeepSeek-V3's auxiliary-loss-free balancing (update e_score_correction_bias).
    balancing: str = "aux_loss"
    bias_update_rate: float = 1e-3
    #: Domain mixing: p(domain) proportional to n_tokens ** temperature (0.5 upsamples small domains).
    domain_temperature: float = 0.5
    commit: bool = False  # shipped under zoo/assets (must stay <= 10 MB in fp16)
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=1,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)

#: The stronger references (issue 13): hidden 256, 8 layers, 4 heads of width 64.
_WIDE = dict(_COMMON, hidden_size=256, num_hidden_layers=8, num_attention_heads=4)

RECIPES: dict[str, TrainRecipe] = {
    r.name: r
    for r in (
        TrainRecipe(
            name="mixtral-ref",
            config_class="MixtralConfig",
            config=dict(
                _COMMON,
                intermediate_size=256,
                num_local_experts=8,
                num_experts_per_tok=2,
                router_aux_loss_coef=0.02,
                sliding_window=None,
            ),
            steps=800,
            commit=True,
            notes="Mixtral-style: 8 experts, top-2, softmax-top-k-renormalise router.",
        ),
        TrainRecipe(
            name="deepseek-ref",
            config_class="DeepseekV3Config",
            config=dict(
                _COMMON,
                intermediate_size=384,  # the dense first layer
                moe_intermediate_size=64,
                n_routed_experts=32,
                num_experts_per_tok=4,
                n_shared_experts=1,
                first_k_dense_replace=1,
                n_group=4,
                topk_group=2,
                norm_topk_prob=True,
                routed_scaling_factor=2.5,
                q_lora_rank=None,
                kv_lora_rank=64,
                qk_rope_head_dim=16,
                qk_nope_head_dim=32,
                v_head_dim=32,
                num_key_value_heads=4,
            ),
            steps=800,
            balancing="bias",
            bias_update_rate=1e-3,
            notes="DeepSeek-V3-style: 32 fine-grained routed experts in 4 groups, top-4 within 2 groups, "
            "1 shared expert, first layer dense, sigmoid router with aux-loss-free bias balancing.",
        ),
        TrainRecipe(
            name="olmoe-ref",
            config_class="OlmoeConfig",
            config=dict(
                _COMMON,
                intermediate_size=96,
                num_experts=16,
                num_experts_per_tok=4,
                norm_topk_prob=False,
                router_aux_loss_coef=0.02,
                num_key_value_heads=4,
            ),
            steps=900,
            notes="OLMoE-style: 16 experts, top-4, softmax router without renormalisation.",
        ),
        TrainRecipe(
            name="qwen3-ref",
            config_class="Qwen3MoeConfig",
            config=dict(
                _WIDE,
                num_key_value_heads=2,
                head_dim=64,
                intermediate_size=768,
                moe_intermediate_size=192,
                num_experts=16,
                num_experts_per_tok=4,
                norm_topk_prob=True,
                decoder_sparse_step=1,
                mlp_only_layers=[],
                router_aux_loss_coef=0.01,
            ),
            steps=1000,
            lr=2e-3,
            notes="Qwen3-MoE-style, the stronger reference (issue 13): hidden 256, 8 layers, 16 experts of "
            "width 192, top-4 renormalised; ~21.5 M parameters, wide enough that top-4 -> top-2 costs "
            "a measurable gap.",
        ),
        TrainRecipe(
            name="olmoe-wide",
            config_class="OlmoeConfig",
            config=dict(
                _WIDE,
                num_key_value_heads=4,
                intermediate_size=96,
                num_experts=32,
                num_experts_per_tok=8,
                norm_topk_prob=False,
                router_aux_loss_coef=0.01,
            ),
            steps=1000,
            lr=2e-3,
            notes="OLMoE-style with fine-grained experts, the Compressed Experts reference (issue 13): "
            "hidden 256, 8 layers, 32 experts of width 96, top-8 without renormalisation (OLMoE's "
            "routing, the model the CE paper fine-tunes top-8 -> 4 + 4); ~22 M parameters.",
        ),
    )
}


def get_recipe(name: str) -> TrainRecipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise KeyError(f"unknown reference model {name!r}; known: {', '.join(RECIPES)}") from None


def build_config(recipe: TrainRecipe):
    import transformers

    config = getattr(transformers, recipe.config_class)(**recipe.config)
    config.output_router_logits = False  # only on during training; evaluation does not need it
    return config
