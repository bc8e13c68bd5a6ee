"""What one architecture family looks like in transformers 5 (one `FamilySpec` per family).

Every family file in this package describes its MoE block with a `FamilySpec`; `MoELayerView`
(arch/view.py) turns a spec plus a live block into the uniform per-expert view that methods use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Scores = Callable[[torch.Tensor, torch.nn.Module], torch.Tensor]


def softmax_scores(logits: torch.Tensor, router: torch.nn.Module) -> torch.Tensor:
    """Softmax over all experts: the gate value before top-k (Mixtral, Qwen, OLMoE, DeepSeek-V2)."""
    return torch.softmax(logits.float(), dim=-1)


def sigmoid_scores(logits: torch.Tensor, router: torch.nn.Module) -> torch.Tensor:
    """Independent sigmoid scores (DeepSeek-V3); the correction bias only steers selection."""
    return torch.sigmoid(logits.float())


@dataclass(frozen=True)
class FamilySpec:
    """Static facts about one MoE family.

    Attributes:
        model_type: `config.model_type` this spec serves.
        expert_count_key: config key written to config.json for the number of routed experts.
        router_attr: attribute of the MoE block holding the router (`gate` or `router`).
        layout: `fused` (gate_up_proj [E,2I,H], gate rows first; down_proj [E,H,I]) or
            `interleaved_transposed` (gpt-oss: gate_up_proj [E,H,2I], gate = [..., ::2]).
        scores: maps router logits to per-expert gate scores `[T, E]` (before top-k).
        shared_expert_attrs: block attributes that hold shared experts (never compressed).
        block_returns_tuple: the block returns `(hidden, router_scores)` (gpt-oss).
        router_buffers: per-expert router tensors besides `weight` that must be sliced with it.
        notes: routing summary shown in `moepress inspect` and errors.
        hub_block, hub_expert_names: the on-disk (hub) layout that `save_pretrained` writes by
            default: per-expert `{layer}.{hub_block}.experts.{j}.{gate|up|down}.weight`
            (None = the fused in-memory keys are also the disk keys, as for gpt-oss).
    """

    model_type: str
    expert_count_key: str
    router_attr: str = "gate"
    layout: str = "fused"
    scores: Scores = softmax_scores
    shared_expert_attrs: tuple[str, ...] = ()
    block_returns_tuple: bool = False
    router_buffers: tuple[str, ...] = ()
    notes: str = ""
    hub_block: str = "mlp"
    hub_expert_names: tuple[str, str, str] | None = ("gate_proj", "up_proj", "down_proj")

    def shared_output(self, block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """Output of the shared expert(s) for flat tokens `x [T,H]`, or None."""
        if not self.shared_expert_attrs:
            return None
        if "shared_expert_gate" in self.shared_expert_attrs:  # Qwen2-MoE: sigmoid-gated shared expert
            return torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
        return getattr(block, self.shared_expert_attrs[0])(x)
