"""Active-parameter accounting for Compressed Experts (He et al. 2025, §2.4 and App. A).

Pure arithmetic on counts (no model objects). With `L` MoE layers of `N` routed experts of `P`
parameters each, top-`k` routing, and `V` vector parameters per expert:

    active(top-k)           = total - L N P + L k P
    active(k_main + CE)     = total - L N P + L (k_main P + (k - k_main) V)
    stored(k_main + CE)     = total + L N V          (every expert stays stored)

"Active" counts the `k - k_main` auxiliary experts' vectors a token reads. The paper counts the
vectors as negligible and leaves them out (Phi-3.5-MoE: 7.45B -> 4.93B); they change the figure by
< 0.01%.
"""

from __future__ import annotations

# The one expert count, defined beside the expert forward in the file that ships in checkpoints.
from ..modeling.moepress_family import expert_parameters

__all__ = ["compressed_experts_parameter_counts", "compressed_vector_parameters", "expert_parameters"]


def compressed_vector_parameters(hidden_size: int, intermediate_size: int) -> int:
    """Vector parameters of one compressed expert: gate-input and up-input `H` each, intermediate `I`."""
    return 2 * hidden_size + intermediate_size


def compressed_experts_parameter_counts(
    total: int, moe_layers: int, num_experts: int, top_k: int, k_main: int,
    expert_params: int, vector_params: int,
) -> dict[str, int]:
    """Stored and active parameters before/after Compressed Experts (formulas in the module doc).

    Args:
        total: every parameter of the stock model (embeddings, attention, norms, routers, experts).
        moe_layers, num_experts, top_k: L, N, k. k_main: main experts computed per token.
        expert_params: P, one routed expert. vector_params: V, one compressed expert.
    Returns dict: total_stock, active_topk, active_topk_main (no vectors),
        total_compressed, active_compressed.
    """
    if not 1 <= k_main <= top_k:
        raise ValueError(f"k_main must be in [1, top_k={top_k}], got {k_main}")
    base = total - moe_layers * num_experts * expert_params
    return {
        "total_stock": total,
        "active_topk": base + moe_layers * top_k * expert_params,
        "active_topk_main": base + moe_layers * k_main * expert_params,
        "total_compressed": total + moe_layers * num_experts * vector_params,
        "active_compressed": base + moe_layers * (k_main * expert_params + (top_k - k_main) * vector_params),
    }
