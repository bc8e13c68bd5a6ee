"""What one architecture family looks like in transformers 5 (one `FamilySpec` per family).

The facts themselves are the family's row in `moepress/modeling/moepress_family.py` (the file that
ships inside checkpoints, so custom blocks read the same row); `FamilySpec` is that row plus the
methods arch adds: router scores, shared-expert output, and what the routing does for a given
config. `MoELayerView` (arch/view.py) turns a spec plus a live block into the per-expert view.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..modeling.moepress_family import ExpertFormat, Family, shared_expert_output


def softmax_scores(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over all experts: the gate value before top-k (Mixtral, Qwen, OLMoE, DeepSeek-V2, ...)."""
    return torch.softmax(logits.float(), dim=-1)


def sigmoid_scores(logits: torch.Tensor) -> torch.Tensor:
    """Independent sigmoid scores (DeepSeek-V3); the correction bias only steers selection."""
    return torch.sigmoid(logits.float())


SCORE_FUNCTIONS = {"softmax": softmax_scores, "sigmoid": sigmoid_scores}


@dataclass(frozen=True)
class GroupRouting:
    """Group-limited top-k of one config: experts in `n_group` contiguous groups, a token picks its
    top-k among the best `topk_group` groups, each group scored by its best `score_experts`."""

    n_group: int
    topk_group: int
    score_experts: int


@dataclass(frozen=True)
class FamilySpec(Family):
    """A family row (`moepress_family.Family`, every attribute documented there) with arch's methods."""

    @classmethod
    def of(cls, family: Family) -> "FamilySpec":
        return cls(**{f.name: getattr(family, f.name) for f in dataclasses.fields(Family)})

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-expert router scores `[T, E]` before top-k, from the router logits."""
        return SCORE_FUNCTIONS[self.score_kind](logits)

    def shared_output(self, block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """Output of the shared expert(s) for flat tokens `x [T,H]`, or None."""
        return shared_expert_output(self, block, x)

    def expert_format(self, config) -> ExpertFormat:
        """Stored layout, biases and activation of the routed experts, with `config`'s constants."""
        return ExpertFormat(self, config)

    def renormalises(self, config) -> bool:
        """Whether the router divides the top-k weights by their sum for this config."""
        if self.renormalise == "norm_topk_prob":
            return bool(getattr(config, "norm_topk_prob", False))
        return self.renormalise == "always"

    def routing_scale(self, config) -> float:
        """Factor the router multiplies the top-k weights by (DeepSeek's routed_scaling_factor), else 1."""
        value = None if self.routing_scale_key is None else getattr(config, self.routing_scale_key, None)
        return 1.0 if value is None else float(value)

    def group_routing(self, config) -> GroupRouting | None:
        """The group-limited routing this config runs, or None when selection is plain top-k.

        One group (`n_group` 1 or unset) still returns a GroupRouting for `always` families: the
        router's group scoring then needs `score_experts` experts in that one group.
        """
        if self.group_limited == "never":
            return None
        if self.group_limited == "group_limited_greedy" and getattr(config, "topk_method", None) != self.group_limited:
            return None  # DeepSeek-V2 runs plain greedy top-k unless topk_method names the group method
        n_group = int(getattr(config, "n_group", None) or 1)
        if n_group == 1 and self.group_limited != "always":
            return None
        return GroupRouting(n_group, int(getattr(config, "topk_group", None) or 1), self.group_score_experts)
