"""The uniform view of one MoE layer (docs/design.md#arch).

transformers 5 stores routed experts as fused 3-D parameters. `MoELayerView` exposes them per
expert in one convention whatever the family:

- `gate_proj`, `up_proj`: `[E, I, H]`; `down_proj`: `[E, H, I]` (weights as `[out, in]`).
  For the `fused` layout these are *views* of the live parameters (writes go through);
  for gpt-oss (`interleaved_transposed`) they are strided views as well (`[..., ::2]` transposed).
- `gate_bias`, `up_bias`: `[E, I]`, `down_bias`: `[E, H]`, or None when the family has none.
- `route(x)` calls the model's own router module, so routing is reproduced exactly; the routing
  facts (score kind, renormalisation, group limits, scale) come from the spec.
The layout conversion, the activation and the one-expert forward are `ExpertFormat`'s
(modeling/moepress_family.py), shared with the custom blocks that ship in checkpoints.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import nn

from .spec import FamilySpec, GroupRouting


class Routing(NamedTuple):
    """Router outputs for flat tokens: logits/scores `[T, E]`, weights/index `[T, k]`."""

    logits: torch.Tensor
    scores: torch.Tensor
    weights: torch.Tensor
    index: torch.Tensor


class MoELayerView:
    """Per-expert access to one live MoE block.

    Args:
        block: the MoE module (e.g. `MixtralSparseMoeBlock`), left in place.
        spec: the family's `FamilySpec`.
        config: the model config (used to rebuild the block with another expert count).
        layer_index: index of the decoder layer that holds the block.
    """

    def __init__(self, block: nn.Module, spec: FamilySpec, config, layer_index: int):
        self.block = block
        self.spec = spec
        self.config = config
        self.layer_index = layer_index
        self.expert_format = spec.expert_format(config)

    # ------------------------------------------------------------------ structure
    @property
    def router(self) -> nn.Module:
        return getattr(self.block, self.spec.router_attr)

    @property
    def experts(self) -> nn.Module:
        return self.block.experts

    @property
    def num_experts(self) -> int:
        return self.experts.gate_up_proj.shape[0]

    @property
    def top_k(self) -> int:
        return int(self.config.num_experts_per_tok)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def intermediate_size(self) -> int:
        return self.gate_proj.shape[1]

    @property
    def interleaved(self) -> bool:
        return self.expert_format.interleaved

    def _unpacked(self) -> dict:
        e = self.experts
        return self.expert_format.unpack(e.gate_up_proj, e.down_proj, getattr(e, "gate_up_proj_bias", None),
                                         getattr(e, "down_proj_bias", None))

    @property
    def gate_proj(self) -> torch.Tensor:
        return self._unpacked()["gate"]

    @property
    def up_proj(self) -> torch.Tensor:
        return self._unpacked()["up"]

    @property
    def down_proj(self) -> torch.Tensor:
        return self._unpacked()["down"]

    @property
    def gate_bias(self) -> torch.Tensor | None:
        return self._unpacked()["gate_bias"]

    @property
    def up_bias(self) -> torch.Tensor | None:
        return self._unpacked()["up_bias"]

    @property
    def down_bias(self) -> torch.Tensor | None:
        return self._unpacked()["down_bias"]

    @property
    def parameters_per_expert(self) -> int:
        """Parameters of one routed expert (weights and biases)."""
        return self.expert_format.parameters_per_expert(self.hidden_size, self.intermediate_size)

    # ------------------------------------------------------------------ routing facts
    @property
    def score_kind(self) -> str:
        """`softmax` or `sigmoid`: what `route(x).scores` holds."""
        return self.spec.score_kind

    @property
    def renormalises(self) -> bool:
        """The router divides the top-k weights by their sum (e.g. `norm_topk_prob`)."""
        return self.spec.renormalises(self.config)

    @property
    def routing_scale(self) -> float:
        """Factor on the top-k weights (DeepSeek's `routed_scaling_factor`), else 1."""
        return self.spec.routing_scale(self.config)

    @property
    def group_routing(self) -> GroupRouting | None:
        """The group-limited routing of this layer's config, or None for plain top-k."""
        return self.spec.group_routing(self.config)

    def router_tensors(self) -> dict[str, torch.Tensor]:
        """Every per-expert router tensor (`weight` and e.g. `bias`, `e_score_correction_bias`)."""
        out = {"weight": self.router.weight}
        for name in self.spec.router_buffers:
            t = getattr(self.router, name, None)
            if t is not None:
                out[name] = t
        return out

    # ------------------------------------------------------------------ compute
    def route(self, x: torch.Tensor) -> Routing:
        """Route flat tokens `x [T, H]` with the model's own router module."""
        logits, weights, index = self.router(x)
        return Routing(logits, self.spec.scores(logits), weights, index)

    def activation(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The family's gated activation on pre-activations `[T, I]` (SwiGLU or clamped SwiGLU)."""
        return self.expert_format.activation(gate, up)

    def intermediate(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """Intermediate activation `h_j(x) [T, I]` of routed expert j."""
        stored = self.expert_format.stored_expert(self.experts, j)
        return self.expert_format.intermediate(x, stored["gate_up"], stored.get("gate_up_bias"))

    def expert(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """Output `E_j(x) [T, H]` of routed expert j (no routing weight)."""
        return self.expert_format.forward(x, **self.expert_format.stored_expert(self.experts, j))

    def intermediate_of(self, expert: dict, x: torch.Tensor) -> torch.Tensor:
        """`h(x) [T, I]` of an expert given in the view convention (e.g. a merged one).

        `expert`: `gate`, `up` `[I, H]` and `gate_bias`, `up_bias` `[I]` (None or absent without biases).
        """
        packed = self.expert_format.pack(expert["gate"], expert["up"], gate_bias=expert.get("gate_bias"),
                                         up_bias=expert.get("up_bias"))
        return self.expert_format.intermediate(x, packed["gate_up_proj"], packed.get("gate_up_proj_bias"))

    def routed_output(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Weighted sum of the routed experts via the model's own experts module: `[T, H]`."""
        return self.experts(x, routing.index, routing.weights)

    def shared_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """Shared-expert contribution `[T, H]` (Qwen2-MoE gate included) or None."""
        return self.spec.shared_output(self.block, x)

    def forward(self, x: torch.Tensor, block: torch.nn.Module | None = None) -> torch.Tensor:
        """A whole block on flat tokens `x [T, H]` -> `[T, H]`: the live block, or `block` (a
        replacement built for this layer, stock or moepress, which returns what the family's
        block returns)."""
        return self.block_output((self.block if block is None else block)(x.unsqueeze(0)), x.shape)

    def block_output(self, out, shape) -> torch.Tensor:
        """The hidden states of a block's return value (gpt-oss blocks return `(hidden, router
        scores)`: `Family.block_returns_tuple`), reshaped to `shape`."""
        if self.spec.block_returns_tuple:
            out = out[0]
        return out.reshape(shape)

    # ------------------------------------------------------------------ rewrite
    def rebuild(
        self,
        gate: torch.Tensor,
        up: torch.Tensor,
        down: torch.Tensor,
        router: dict[str, torch.Tensor],
        gate_bias: torch.Tensor | None = None,
        up_bias: torch.Tensor | None = None,
        down_bias: torch.Tensor | None = None,
    ) -> nn.Module:
        """A new block of the same class holding M = `gate.shape[0]` experts.

        Args:
            gate, up: `[M, I, H]`; down: `[M, H, I]` (this view's convention).
            router: per-expert router tensors with M rows, keyed like `router_tensors()`.
            gate_bias, up_bias `[M, I]`, down_bias `[M, H]`: required iff the family has biases.
        Returns:
            the new block; shared experts and every other tensor are copied from this block.
            The caller installs it (`set_moe_block`) and updates the model config.
        """
        packed = self.expert_format.pack(gate, up, down, gate_bias, up_bias, down_bias)
        return self._assemble(gate.shape[0], router, packed)

    def _assemble(self, m: int, router: dict[str, torch.Tensor], packed: dict[str, torch.Tensor]) -> nn.Module:
        """A new block of `m` experts from stored-layout expert tensors `packed` and router rows."""
        cfg = copy.deepcopy(self.config)
        set_expert_count(cfg, self.spec, m)
        with torch.device("meta"):
            new = type(self.block)(cfg)
        state = {k: v for k, v in self.block.state_dict().items()}
        prefix_r = self.spec.router_attr + "."
        for name, t in router.items():
            state[prefix_r + name] = t
        for name, t in packed.items():
            state["experts." + name] = t.contiguous()
        # Never alias the old block's storage: the caller may still read the original.
        old = {t.data_ptr() for t in self.block.state_dict().values()}
        state = {k: v.detach().clone() if v.data_ptr() in old else v.detach() for k, v in state.items()}
        new.load_state_dict(state, strict=True, assign=True)
        new.train(self.block.training)
        return new

    def subset_router(self, keep: list[int] | torch.Tensor) -> nn.Module:
        """A copy of the router restricted to experts `keep` (the model's routing over the survivors)."""
        idx = torch.as_tensor(keep, dtype=torch.long, device=self.router.weight.device)
        router = copy.deepcopy(self.router)
        with torch.no_grad():
            for name, t in self.router_tensors().items():
                sliced = t.detach()[idx].clone()
                if isinstance(getattr(router, name), nn.Parameter):
                    setattr(router, name, nn.Parameter(sliced, requires_grad=False))
                else:
                    setattr(router, name, sliced)
        for attr in ("num_experts", "out_features"):
            if hasattr(router, attr):
                setattr(router, attr, len(idx))
        return router

    def select(self, keep: list[int] | torch.Tensor) -> nn.Module:
        """A new block holding only the experts `keep` (router rows sliced the same way)."""
        idx = torch.as_tensor(keep, dtype=torch.long, device=self.experts.gate_up_proj.device)
        router = {k: v.detach()[idx] for k, v in self.router_tensors().items()}
        # every stored expert tensor (either layout) has the expert first: slice it as stored, one copy
        # of the kept experts (no unpack/pack round trip: a 128-expert layer's would be twice the size)
        packed = {name: getattr(self.experts, name).detach()[idx]
                  for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")
                  if getattr(self.experts, name, None) is not None}
        return self._assemble(len(idx), router, packed)


def set_expert_count(config, spec: FamilySpec, count: int) -> None:
    """Write the routed-expert count into `config` under the family's key (aliases follow)."""
    setattr(config, spec.expert_count_key, int(count))
