"""The remapped MoE block: the model's own N-way router, N experts mapped onto M merged experts.

Ships inside checkpoints (torch + transformers only). Used by the merging methods (MergeMoE,
M-SMoE, HC-SMoE, ZipIt, average; docs/algorithms.md#remapped-block).

Forward for flat tokens x [T, H]: the router gives top-k `(weights, index)` over the N original
experts; `expert_map[index]` names the merged expert of each choice; the routing weights of
choices that land on the same merged expert are summed (MergeMoE's `A · mask_topK(...)`), and
each merged expert runs once per token that chose any of its members.

Stored tensors (checkpoint keys directly under the block, M merged experts) use the family's own
fused expert layout, because GEMM results depend on the operand shapes: with the same layout an
identity map reproduces the stock block bit for bit (separate gate/up matrices differ by ~1 ulp).
- SwiGLU families: `gate_up_proj [M, 2I, H]` (gate rows first), `down_proj [M, H, I]`.
- gpt-oss: `gate_up_proj [M, H, 2I]` (gate = [..., ::2], up = [..., 1::2]), `gate_up_proj_bias [M, 2I]`,
  `down_proj [M, I, H]`, `down_proj_bias [M, H]`.
- the persistent buffer `expert_map [N]` (long).
`from_weights` takes the per-expert view convention (gate/up `[M, I, H]`, down `[M, H, I]`).
"""

from __future__ import annotations

import torch
from torch import nn

from .moepress_common import MoepressBlock
from .moepress_experts import StockExpertCount
from .moepress_family import family_facts


class RemappedMoeBlock(MoepressBlock):
    """Original router + `expert_map [N] -> [0, M)` + M merged SwiGLU experts."""

    kind = "remap"

    def __init__(self, stock: nn.Module, config, num_merged: int, intermediate_size: int, num_experts: int):
        super().__init__(stock, config)
        m, i, h = int(num_merged), int(intermediate_size), self.hidden_size
        dtype = getattr(stock, self.router_attr).weight.dtype
        self.num_merged, self.num_experts, self.intermediate_size = m, int(num_experts), i
        for name, shape in self.expert_format.stored_shapes(m, h, i).items():  # the stock experts' layout
            setattr(self, name, nn.Parameter(torch.empty(shape, dtype=dtype)))
        self.register_buffer("expert_map", torch.arange(self.num_experts) % max(m, 1), persistent=True)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_weights(cls, stock: nn.Module, config, expert_map: torch.Tensor, gate: torch.Tensor,
                     up: torch.Tensor, down: torch.Tensor, gate_bias=None, up_bias=None, down_bias=None):
        """A block holding the given merged weights (copied, never aliased).

        Args:
            stock: the live stock block (its router and shared experts are adopted).
            expert_map: `[N]` long, values in [0, M), every merged expert used at least once.
            gate, up: `[M, I, H]`; down: `[M, H, I]`; biases `[M, I]`/`[M, H]` iff the family has them.
        """
        expert_map = torch.as_tensor(expert_map, dtype=torch.long).flatten()
        m = gate.shape[0]
        if int(expert_map.max()) + 1 != m or torch.unique(expert_map).numel() != m:
            raise ValueError(f"expert_map must use every merged expert 0..{m - 1} at least once")
        block = cls(stock, config, m, gate.shape[1], expert_map.numel())
        stock_storage = {t.untyped_storage().data_ptr() for t in stock.state_dict().values()}
        with torch.no_grad():
            for name, value in block.pack(gate, up, down, gate_bias, up_bias, down_bias).items():
                param = getattr(block, name)
                value = value.detach().to(param.dtype).contiguous()
                if value.untyped_storage().data_ptr() in stock_storage:  # never alias the original
                    value = value.clone()
                param.data = value
            block.expert_map.copy_(expert_map)
        return block.to(gate.device)

    def pack(self, gate, up, down, gate_bias=None, up_bias=None, down_bias=None) -> dict:
        """View-convention tensors -> this block's stored tensors (the family's fused layout)."""
        return self.expert_format.pack(gate, up, down, gate_bias, up_bias, down_bias)

    def unpack(self) -> dict:
        """This block's merged experts in the view convention (`gate`, `up`, `down`, biases or None)."""
        biases = (self.gate_up_proj_bias, self.down_proj_bias) if self.biased else (None, None)
        return self.expert_format.unpack(self.gate_up_proj, self.down_proj, *biases)

    @classmethod
    def from_layer_config(cls, stock: nn.Module, config, layer_cfg: dict) -> "RemappedMoeBlock":
        """The block of `layer_cfg`; its router has `num_experts` rows, which may be fewer than the config's
        count (a pruned layer of a per-layer budget, quantized as an identity remap): then the stock block
        it adopts the router from is built with that count."""
        n = int(layer_cfg["num_experts"])
        if n != getattr(config, family_facts(config.model_type).expert_count_key, n):
            stock = StockExpertCount.from_layer_config(stock, config, {"num_experts": n})
        return cls(stock, config, layer_cfg["num_merged"], layer_cfg["intermediate_size"], n)

    def layer_config(self) -> dict:
        return {
            "kind": self.kind,
            "num_merged": self.num_merged,
            "num_experts": self.num_experts,
            "intermediate_size": self.intermediate_size,
        }

    def moepress_parameter_counts(self) -> tuple[int, int, int]:
        per_expert = self.expert_format.parameters_per_expert(self.hidden_size, self.intermediate_size)
        return per_expert * self.num_merged, per_expert * min(self.top_k, self.num_merged), self.num_merged

    # ------------------------------------------------------------------ compute
    def merged_expert(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Output of merged expert i on `x [t, H]` (no routing weight); same ops as the stock experts."""
        return self.expert_format.forward(x, **self.expert_format.stored_expert(self, i))

    def routed(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        merged = self.expert_map[index]  # [T, k]
        for i in torch.unique(merged).tolist():  # sorted, like the stock eager loop
            hit = merged == i
            # Each token once, at its first top-k slot; tokens ordered (slot, token) as in the stock
            # eager loop, so an identity map reproduces the stock block bit for bit.
            first = hit & (hit.cumsum(dim=-1) == 1)
            _, token_idx = torch.where(first.T)
            w = (weights * hit).sum(dim=-1)[token_idx]  # A · topk: weights of one cluster summed
            y = self.merged_expert(i, x[token_idx]) * w[:, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


KINDS = {RemappedMoeBlock.kind: RemappedMoeBlock}
