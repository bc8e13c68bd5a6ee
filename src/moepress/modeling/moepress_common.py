"""Shared frame of every moepress custom MoE block. Ships inside checkpoints: torch + transformers only.

A custom block keeps the family's own router module (and shared experts) as children under the
same attribute names as the stock block, so routing is the model's own and checkpoint keys for
those parts are unchanged. Subclasses implement `routed(x, weights, index) -> [T, H]`. Every
per-family fact comes from the family's row in `moepress_family.py`.
"""

from __future__ import annotations

import torch
from torch import nn

from .moepress_family import ExpertFormat, family_facts, shared_expert_output


class MoepressBlock(nn.Module):
    """Base of custom blocks: routing and shared experts as in the stock block, routed part abstract.

    Args:
        stock: a freshly built stock block of the family (its router/shared modules are adopted).
        config: the model config; `config.model_type` selects the family row.
    """

    is_moepress_block = True
    kind = "base"

    def __init__(self, stock: nn.Module, config):
        super().__init__()
        self.model_type = config.model_type
        self.family = family_facts(self.model_type)
        self.router_attr = self.family.router_attr
        setattr(self, self.router_attr, getattr(stock, self.router_attr))
        for name in self.family.shared_expert_attrs:
            setattr(self, name, getattr(stock, name))
        self.hidden_size = config.hidden_size
        self.top_k = config.num_experts_per_tok
        self.expert_format = ExpertFormat(self.family, config)
        self.biased = self.expert_format.biased

    @property
    def router(self) -> nn.Module:
        # _modules, not getattr: for phimoe/gpt-oss the attribute *is* named "router" (this property)
        return self._modules[self.router_attr]

    def gated_activation(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The family's gated activation (SwiGLU, or gpt-oss's clamped SwiGLU)."""
        return self.expert_format.activation(gate, up)

    def shared(self, x: torch.Tensor) -> torch.Tensor | None:
        return shared_expert_output(self.family, self, x)

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
        if self.family.block_returns_tuple:  # gpt-oss decoder layers unpack (hidden, router_scores)
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
