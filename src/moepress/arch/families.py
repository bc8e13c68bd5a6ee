"""The table of supported families. Adding a family = one row here + one row in the test table.

Each row was checked against the transformers 5.23 modeling file of that family (block class,
router attribute, expert layout, routing) — see ../shared/ENVIRONMENT.md §2.
"""

from __future__ import annotations

from .spec import FamilySpec, sigmoid_scores, softmax_scores

FAMILIES: dict[str, FamilySpec] = {
    spec.model_type: spec
    for spec in (
        FamilySpec(
            "mixtral", "num_local_experts",
            hub_block="block_sparse_moe", hub_expert_names=("w1", "w3", "w2"),
            notes="softmax over E -> top-k -> renormalise",
        ),
        FamilySpec(
            "qwen2_moe", "num_experts",
            shared_expert_attrs=("shared_expert", "shared_expert_gate"),
            notes="softmax -> top-k, renormalise iff norm_topk_prob; sigmoid-gated shared expert",
        ),
        FamilySpec(
            "qwen3_moe", "num_experts",
            notes="softmax -> top-k, renormalise iff norm_topk_prob",
        ),
        FamilySpec(
            "olmoe", "num_experts",
            notes="softmax -> top-k, renormalise iff norm_topk_prob",
        ),
        FamilySpec(
            "deepseek_v2", "n_routed_experts",
            shared_expert_attrs=("shared_experts",),
            notes="softmax -> (group-limited) top-k x routed_scaling_factor; shared experts; dense first layers",
        ),
        FamilySpec(
            "deepseek_v3", "n_routed_experts",
            scores=sigmoid_scores,
            shared_expert_attrs=("shared_experts",),
            router_buffers=("e_score_correction_bias",),
            notes="sigmoid + e_score_correction_bias, group-limited top-k, x routed_scaling_factor; "
            "shared experts; dense first layers",
        ),
        FamilySpec(
            "phimoe", "num_local_experts",
            router_attr="router",
            hub_block="block_sparse_moe", hub_expert_names=("w1", "w3", "w2"),
            notes="sparsemixer top-2 (weights need not sum to 1)",
        ),
        FamilySpec(
            "gpt_oss", "num_local_experts",
            router_attr="router",
            layout="interleaved_transposed",
            scores=softmax_scores,
            block_returns_tuple=True,
            hub_expert_names=None,
            router_buffers=("bias",),
            notes="top-k on biased logits -> softmax over the k; clamped SwiGLU with biases",
        ),
    )
}

SUPPORTED = tuple(FAMILIES)
