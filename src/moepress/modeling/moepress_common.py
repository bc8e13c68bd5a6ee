"""Shared frame of every moepress custom MoE block. Ships inside checkpoints: torch + transformers only.

A custom block keeps the family's own router module (and shared experts) as children under the
same attribute names as the stock block, so routing is the model's own and checkpoint keys for
those parts are unchanged. Subclasses implement `routed(x, weights, index) -> [T, H]`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

ROUTER_ATTR = {"phimoe": "router", "gpt_oss": "router"}
SHARED_ATTRS = {
    "qwen2_moe": ("shared_expert", "shared_expert_gate"),
    "deepseek_v2": ("shared_experts",),
    "deepseek_v3": ("shared_experts",),
}
TUPLE_OUTPUT = {"gpt_oss"}  # gpt-oss decoder layers unpack (hidden, router_scores)
BIASED_EXPERTS = {"gpt_oss"}


class MoepressBlock(nn.Module):
    """Base of custom blocks: routing and shared experts as in the stock block, routed part abstract.

    Args:
        stock: a freshly built stock block of the family (its router/shared modules are adopted).
        config: the model config; `config.model_type` selects the family behaviour.
    """

    is_moepress_block = True
    kind = "base"

    def __init__(self, stock: nn.Module, config):
        super().__init__()
        self.model_type = config.model_type
        self.router_attr = ROUTER_ATTR.get(self.model_type, "gate")
        setattr(self, self.router_attr, getattr(stock, self.router_attr))
        for name in SHARED_ATTRS.get(self.model_type, ()):
            setattr(self, name, getattr(stock, name))
        self.hidden_size = config.hidden_size
        self.top_k = config.num_experts_per_tok
        self.biased = self.model_type in BIASED_EXPERTS
        self.swiglu_alpha = getattr(config, "swiglu_alpha", None)
        self.swiglu_limit = getattr(config, "swiglu_limit", None)
        self.act_fn = ACT2FN[getattr(config, "hidden_act", "silu")]

    @property
    def router(self) -> nn.Module:
        # _modules, not getattr: for phimoe/gpt-oss the attribute *is* named "router" (this property)
        return self._modules[self.router_attr]

    def gated_activation(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """SwiGLU, or gpt-oss's clamped SwiGLU `(up + 1) * gate * sigmoid(alpha * gate)`."""
        if self.biased:
            gate = gate.clamp(max=self.swiglu_limit)
            up = up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)
            return (up + 1) * (gate * torch.sigmoid(gate * self.swiglu_alpha))
        return self.act_fn(gate) * up

    def shared(self, x: torch.Tensor) -> torch.Tensor | None:
        names = SHARED_ATTRS.get(self.model_type, ())
        if not names:
            return None
        if "shared_expert_gate" in names:
            return torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return getattr(self, names[0])(x)

    def routed(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, hidden_states: torch.Tensor):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        _, weights, index = self.router(x)
        out = self.routed(x, weights, index)
        shared = self.shared(x)
        if shared is not None:
            out = out + shared
        out = out.reshape(shape)
        if self.model_type in TUPLE_OUTPUT:
            return out, weights
        return out

    @classmethod
    def from_layer_config(cls, stock: nn.Module, config, layer_cfg: dict) -> "MoepressBlock":
        """Build an empty block of the right shapes (weights come from the checkpoint)."""
        raise NotImplementedError

    def layer_config(self) -> dict:
        """JSON-able `{"kind": self.kind, ...}` stored in `config.moepress["layers"][index]`."""
        raise NotImplementedError

    def moepress_parameter_counts(self) -> tuple[int, int, int]:
        """(routed-expert parameters stored, routed parameters active per token, experts stored)."""
        raise NotImplementedError
