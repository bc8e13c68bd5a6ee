"""Low-rank expert MoE block (MoE-I², Yang et al. 2024: pruned experts + per-expert low-rank
factors). Ships inside checkpoints: torch + transformers only (and the sibling moepress_common).

The layer holds `num_experts` experts (possibly fewer than the model config says: the router's
rows were sliced to the survivors, so its softmax/top-k runs over them). Expert e stores each
projection p as `U_p,e [out, r_p,e] · V_p,e [r_p,e, in]`, ranks differing per expert. The factors of
all experts of one projection are concatenated along the rank axis:

    gate_u, up_u `[I, R]`, gate_v, up_v `[R, H]`, down_u `[H, R_down]`, down_v `[R_down, I]`

where R = Σ_e r_e; expert e owns the slice `offsets[e] : offsets[e + 1]`. Families with expert
biases (gpt-oss) keep them dense: gate_bias, up_bias `[E, I]`, down_bias `[E, H]`.
"""

from __future__ import annotations

import torch
from torch import nn

from .moepress_common import MoepressBlock

PROJECTIONS = ("gate", "up", "down")


def resize_router(router: nn.Module, num_experts: int) -> None:
    """Give a freshly built stock router `num_experts` rows: every direct parameter/buffer whose
    first dimension is the old expert count (weight, bias, e_score_correction_bias) is replaced by
    an empty one of the new count (values come from the checkpoint), and the count attributes follow."""
    old = router.weight.shape[0]
    if old == num_experts:
        return
    for name, param in list(router.named_parameters(recurse=False)):
        if param.dim() >= 1 and param.shape[0] == old:
            setattr(router, name, nn.Parameter(param.new_empty(num_experts, *param.shape[1:]),
                                               requires_grad=param.requires_grad))
    for name, buf in list(router.named_buffers(recurse=False)):
        if buf.dim() >= 1 and buf.shape[0] == old:
            persistent = name not in router._non_persistent_buffers_set
            router.register_buffer(name, buf.new_empty(num_experts, *buf.shape[1:]), persistent=persistent)
    for attr in ("num_experts", "out_features"):
        if hasattr(router, attr):
            setattr(router, attr, num_experts)


class LowRankMoeBlock(MoepressBlock):
    """Router over the kept experts + per-expert low-rank gate/up/down (`kind = "lowrank"`).

    Args:
        stock: a stock block of the family (router and shared experts adopted; the router is
            resized to `num_experts` rows if needed).
        num_experts: experts stored. intermediate: I. ranks: `{"gate"|"up"|"down": [r_e]}`.
    """

    kind = "lowrank"

    def __init__(self, stock, config, *, num_experts: int, intermediate: int, ranks: dict):
        super().__init__(stock, config)
        resize_router(self.router, int(num_experts))
        ref = getattr(getattr(stock, "experts", None), "gate_up_proj", None)
        opts = dict(dtype=ref.dtype if ref is not None else torch.get_default_dtype(),
                    device=ref.device if ref is not None else None)
        e, h, i = int(num_experts), int(config.hidden_size), int(intermediate)
        self.num_experts, self.intermediate = e, i
        self.ranks = {p: [int(r) for r in ranks[p]] for p in PROJECTIONS}
        if any(len(self.ranks[p]) != e for p in PROJECTIONS):
            raise ValueError(f"ranks must list one rank per expert ({e}) for gate, up and down")
        self.offsets = {p: [0] for p in PROJECTIONS}
        for p in PROJECTIONS:
            for r in self.ranks[p]:
                self.offsets[p].append(self.offsets[p][-1] + r)
        rg, ru, rd = (self.offsets[p][-1] for p in PROJECTIONS)
        self.gate_u = nn.Parameter(torch.empty(i, rg, **opts))
        self.gate_v = nn.Parameter(torch.empty(rg, h, **opts))
        self.up_u = nn.Parameter(torch.empty(i, ru, **opts))
        self.up_v = nn.Parameter(torch.empty(ru, h, **opts))
        self.down_u = nn.Parameter(torch.empty(h, rd, **opts))
        self.down_v = nn.Parameter(torch.empty(rd, i, **opts))
        if self.biased:
            self.gate_bias = nn.Parameter(torch.empty(e, i, **opts))
            self.up_bias = nn.Parameter(torch.empty(e, i, **opts))
            self.down_bias = nn.Parameter(torch.empty(e, h, **opts))

    # ------------------------------------------------------------------ export
    @classmethod
    def from_layer_config(cls, stock, config, layer_cfg: dict) -> "LowRankMoeBlock":
        return cls(stock, config, num_experts=layer_cfg["num_experts"], intermediate=layer_cfg["intermediate"],
                   ranks=layer_cfg["ranks"])

    def layer_config(self) -> dict:
        return {"kind": self.kind, "num_experts": self.num_experts, "intermediate": self.intermediate,
                "ranks": {p: list(r) for p, r in self.ranks.items()}}

    def factors(self, proj: str, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(U [out, r], V [r, in])` of projection `proj` of expert e (views)."""
        lo, hi = self.offsets[proj][e], self.offsets[proj][e + 1]
        return getattr(self, f"{proj}_u")[:, lo:hi], getattr(self, f"{proj}_v")[lo:hi]

    def expert_weight(self, proj: str, e: int) -> torch.Tensor:
        """`U V` of projection `proj` for expert e (for inspection and tests)."""
        u, v = self.factors(proj, e)
        return u @ v

    def set_factors(self, factors: dict, biases: dict | None = None) -> None:
        """Fill the block: `factors[proj][e] = (U [out, r], V [r, in])`; `biases[proj]` `[E, out]`."""
        with torch.no_grad():
            for p in PROJECTIONS:
                if self.offsets[p][-1]:
                    getattr(self, f"{p}_u").copy_(torch.cat([u for u, _ in factors[p]], 1))
                    getattr(self, f"{p}_v").copy_(torch.cat([v for _, v in factors[p]], 0))
            if self.biased:
                for p in PROJECTIONS:
                    getattr(self, f"{p}_bias").copy_(biases[p])

    def moepress_parameter_counts(self) -> tuple[int, int, int]:
        """(stored routed parameters, routed parameters of an average expert × top-k, experts stored)."""
        names = [f"{p}_{s}" for p in PROJECTIONS for s in ("u", "v")]
        names += [f"{p}_bias" for p in PROJECTIONS] if self.biased else []
        stored = sum(getattr(self, n).numel() for n in names)
        return stored, round(stored * self.top_k / self.num_experts), self.num_experts

    # ------------------------------------------------------------------ compute
    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Output of expert e on tokens `x [T, H]` (no routing weight)."""
        (gu, gv), (uu, uv), (du, dv) = (self.factors(p, e) for p in PROJECTIONS)
        gate, up = (x @ gv.T) @ gu.T, (x @ uv.T) @ uu.T
        if self.biased:
            gate, up = gate + self.gate_bias[e], up + self.up_bias[e]
        out = (self.gated_activation(gate, up) @ dv.T) @ du.T
        return out + self.down_bias[e] if self.biased else out

    def routed(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in index.unique().tolist():
            token, slot = (index == e).nonzero(as_tuple=True)
            y = self.expert_forward(e, x[token]) * weights[token, slot, None].to(x.dtype)
            out.index_add_(0, token, y)
        return out


KINDS = {LowRankMoeBlock.kind: LowRankMoeBlock}
