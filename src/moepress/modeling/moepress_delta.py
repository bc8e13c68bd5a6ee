"""Delta-decomposed MoE block (D²-MoE, Gu et al., ICML 2025, Eq. 10). Ships inside checkpoints.

Every expert i of the layer is `W_i ≈ W_base + U_i V_i` for each of gate, up and down. The router
is the model's own (MoepressBlock). The forward pass uses the linearity of the base:

- the base gate/up projections run ONCE on all tokens of the batch (`x @ W_base.T`), gathered
  per (token, expert) pair; the per-expert low-rank deltas `(x V_iᵀ) U_iᵀ` are added, batched
  per expert: pairs sorted by expert and multiplied with transformers' grouped matmul (no loop,
  no host sync) when row strides are 16-byte aligned, else a loop over experts like the eager
  stock path; for a few pairs (decode) token-major without sorting;
- the gated activation is per pair (it is nonlinear);
- the base down projection runs ONCE on the routing-weighted sum of the pairs' intermediate
  activations: `Σ_i g_i (W_base + U_i V_i) h_i = W_base (Σ_i g_i h_i) + Σ_i g_i U_i V_i h_i`.

Semi-dynamic channel pruning (Eq. 9): the statically pruned base channels are simply absent
(the block's intermediate width is the kept width); `dynamic_channels` more are dropped by
masking (the channels' activations are zeroed for base and deltas alike), scored
`‖W_down_base[:, j]‖ · |Σ_i g_i h_i[t, j]|`:
- `dynamic_scope="token"` (default): per token t, so a token's output never depends on the other
  tokens of its batch: what a server needs (strangers' requests share batches; decode steps with a
  KV cache see one token, prefill sees the whole prompt). Our deviation, for serving;
- `dynamic_scope="batch"`: the paper's form, one channel set per batch, scored on the batch's
  `‖Σ_i g_i h_i[:, j]‖` over its tokens (outputs then change with batch composition).
Checkpoints that do not record a scope load with the default. Deviation: masking saves no
FLOPs; at the paper's 5% dynamic share a column gather would save under 2% of the base's work
and costs about as much as it saves at decode sizes, so the dynamic half here serves accuracy
(paper Table 6: semi-dynamic beats static at equal sparsity), not speed.

Imports only torch and transformers (and the sibling moepress_common).
"""

from __future__ import annotations

import torch
from torch import nn

from .moepress_common import MoepressBlock

try:  # transformers' grouped matmul dispatch (torch grouped_mm kernel, or its own fallback)
    from transformers.integrations.moe import _grouped_mm
except ImportError:  # pragma: no cover - older/newer transformers: the per-expert loop is used
    _grouped_mm = None

GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

DYNAMIC_SCOPES = ("token", "batch")  # per-token (default, batch-invariant) or the paper's per-batch pruning

GATHER_MAX_PAIRS = 8  # (token, expert) pairs up to which the token-major small-batch path is used


class DeltaMoeBlock(MoepressBlock):
    """Router + one base per projection + per-expert low-rank deltas (`kind = "delta"`).

    Parameters (E experts, H hidden, I kept intermediate channels, r ranks per projection):
        base_gate_up `[2I, H]` (gate rows first), base_down `[H, I]`;
        gate_up_v `[Ev, r_gate + r_up, H]`, gate_u, up_u `[E, I, r]`;
        down_v `[Ev, r_down, I]`, down_u `[E, H, r_down]`; Ev = 1 when `share_v`, else E;
        gate_up_bias `[E, 2I]`, down_bias `[E, H]` for families with expert biases (gpt-oss).
    """

    kind = "delta"

    def __init__(self, stock, config, *, num_experts: int, intermediate: int, ranks: dict,
                 share_v: bool = False, dynamic_channels: int = 0, original_intermediate: int | None = None,
                 dynamic_scope: str = "token"):
        super().__init__(stock, config)
        if dynamic_scope not in DYNAMIC_SCOPES:
            raise ValueError(f"dynamic_scope must be one of {DYNAMIC_SCOPES}, got {dynamic_scope!r}")
        self.dynamic_scope = dynamic_scope
        ref = getattr(getattr(stock, "experts", None), "gate_up_proj", None)
        opts = dict(dtype=ref.dtype if ref is not None else torch.get_default_dtype(),
                    device=ref.device if ref is not None else None)
        e, h, i = int(num_experts), int(config.hidden_size), int(intermediate)
        ev = 1 if share_v else e
        self.num_experts, self.intermediate, self.share_v = e, i, bool(share_v)
        self.ranks = {k: int(ranks[k]) for k in ("gate", "up", "down")}
        rg, ru, rd = self.ranks["gate"], self.ranks["up"], self.ranks["down"]
        self.dynamic_channels = int(dynamic_channels)
        self.original_intermediate = int(original_intermediate or intermediate)
        # gate and up are fused (one matmul each for the base and for the deltas' V side)
        self.base_gate_up = nn.Parameter(torch.empty(2 * i, h, **opts))
        self.base_down = nn.Parameter(torch.empty(h, i, **opts))
        self.gate_up_v = nn.Parameter(torch.empty(ev, rg + ru, h, **opts))
        self.gate_u = nn.Parameter(torch.empty(e, i, rg, **opts))
        self.up_u = nn.Parameter(torch.empty(e, i, ru, **opts))
        self.down_v = nn.Parameter(torch.empty(ev, rd, i, **opts))
        self.down_u = nn.Parameter(torch.empty(e, h, rd, **opts))
        if self.biased:
            self.gate_up_bias = nn.Parameter(torch.empty(e, 2 * i, **opts))
            self.down_bias = nn.Parameter(torch.empty(e, h, **opts))

    # ------------------------------------------------------------------ export
    @classmethod
    def from_layer_config(cls, stock, config, layer_cfg: dict) -> "DeltaMoeBlock":
        fields = {k: layer_cfg[k] for k in ("num_experts", "intermediate", "ranks", "share_v",
                                            "dynamic_channels", "original_intermediate")}
        return cls(stock, config, **fields, dynamic_scope=layer_cfg.get("dynamic_scope", "token"))

    def layer_config(self) -> dict:
        return {
            "kind": self.kind, "num_experts": self.num_experts, "intermediate": self.intermediate,
            "original_intermediate": self.original_intermediate, "ranks": dict(self.ranks),
            "share_v": self.share_v, "dynamic_channels": self.dynamic_channels,
            "dynamic_scope": self.dynamic_scope,
        }

    def set_factors(self, bases: dict, factors: dict, biases: dict | None = None) -> None:
        """Fill the block from per-projection tensors.

        Args:
            bases: `{"gate"|"up": [I, H], "down": [H, I]}`.
            factors: `{proj: (U [E, out, r], V [Ev, r, in])}`.
            biases: `{"gate"|"up": [E, I], "down": [E, H]}` for biased families.
        """
        values = {
            "base_gate_up": torch.cat([bases["gate"], bases["up"]], 0), "base_down": bases["down"],
            "gate_up_v": torch.cat([factors["gate"][1], factors["up"][1]], 1),
            "gate_u": factors["gate"][0], "up_u": factors["up"][0],
            "down_u": factors["down"][0], "down_v": factors["down"][1],
        }
        if self.biased:
            values["gate_up_bias"] = torch.cat([biases["gate"], biases["up"]], 1)
            values["down_bias"] = biases["down"]
        with torch.no_grad():
            for name, value in values.items():
                getattr(self, name).copy_(value)

    def expert_weight(self, proj: str, e: int) -> torch.Tensor:
        """`W_base + U_e V_e` of projection `proj` for expert e (for inspection and tests)."""
        i, rg = self.intermediate, self.ranks["gate"]
        ve = 0 if self.share_v else e
        if proj == "down":
            return self.base_down + self.down_u[e] @ self.down_v[ve]
        v = self.gate_up_v[ve, :rg] if proj == "gate" else self.gate_up_v[ve, rg:]
        base = self.base_gate_up[:i] if proj == "gate" else self.base_gate_up[i:]
        return base + getattr(self, f"{proj}_u")[e] @ v

    def moepress_parameter_counts(self) -> tuple[int, int, int]:
        """(stored routed parameters, routed parameters a token uses, experts stored)."""
        names = ["base_gate_up", "base_down", "gate_up_v", "gate_u", "up_u", "down_v", "down_u"]
        names += ["gate_up_bias", "down_bias"] if self.biased else []
        stored = sum(getattr(self, n).numel() for n in names)
        shared = self.base_gate_up.numel() + self.base_down.numel()
        if self.share_v:
            shared += self.gate_up_v.numel() + self.down_v.numel()
        per_expert = (stored - shared) // self.num_experts
        return stored, shared + self.top_k * per_expert, self.num_experts

    # ------------------------------------------------------------------ compute
    def _pairs(self, index: torch.Tensor, weights: torch.Tensor, sort: bool):
        """Flatten (token, expert) pairs token-major, optionally sorted by expert: (token, expert, weight)."""
        t, k = index.shape
        expert = index.reshape(-1)
        token = torch.arange(t, device=index.device).repeat_interleave(k)
        weight = weights.reshape(-1)
        if sort:
            order = torch.argsort(expert, stable=True)
            token, expert, weight = token[order], expert[order], weight[order]
        return token, expert, weight

    def _gate_up_deltas_gathered(self, x_pairs, expert):
        """`[U_gate V_gate x, U_up V_up x]` for every pair of a small batch.

        On CPU a loop over the pairs with weight views (copying the factors costs more than the
        products); elsewhere one gathered bmm (no host synchronisation).
        """
        rg = self.ranks["gate"]
        if x_pairs.device.type == "cpu":
            rows = []
            for p, e in enumerate(expert.tolist()):
                z = self.gate_up_v[0 if self.share_v else e] @ x_pairs[p]
                rows.append(torch.cat([self.gate_u[e] @ z[:rg], self.up_u[e] @ z[rg:]]))
            return torch.stack(rows)
        v = self.gate_up_v[torch.zeros_like(expert) if self.share_v else expert]   # [P, rg+ru, H]
        z = torch.bmm(v, x_pairs.unsqueeze(-1))                                     # [P, rg+ru, 1]
        gate = torch.bmm(self.gate_u[expert], z[:, :rg]).squeeze(-1)
        up = torch.bmm(self.up_u[expert], z[:, rg:]).squeeze(-1)
        return torch.cat([gate, up], -1)

    def _down_delta_gathered(self, h, expert):
        if h.device.type == "cpu":
            return torch.stack([self.down_u[e] @ (self.down_v[0 if self.share_v else e] @ h[p])
                                for p, e in enumerate(expert.tolist())])
        v = self.down_v[torch.zeros_like(expert) if self.share_v else expert]
        return torch.bmm(self.down_u[expert], torch.bmm(v, h.unsqueeze(-1))).squeeze(-1)

    def _gate_up_deltas_looped(self, x_pairs, counts: list[int]):
        """Gate/up deltas per expert segment of expert-sorted pairs (fallback for unaligned shapes)."""
        i, rg = self.intermediate, self.ranks["gate"]
        out = x_pairs.new_empty(x_pairs.shape[0], 2 * i)
        z_all = x_pairs @ self.gate_up_v[0].T if self.share_v else None
        start = 0
        for e, c in enumerate(counts):
            if c:
                seg = slice(start, start + c)
                z = z_all[seg] if self.share_v else x_pairs[seg] @ self.gate_up_v[e].T
                out[seg, :i] = z[:, :rg] @ self.gate_u[e].T
                out[seg, i:] = z[:, rg:] @ self.up_u[e].T
                start += c
        return out

    def _down_delta_looped(self, h, counts: list[int]):
        out = h.new_empty(h.shape[0], self.base_down.shape[0])
        z_all = h @ self.down_v[0].T if self.share_v else None
        start = 0
        for e, c in enumerate(counts):
            if c:
                seg = slice(start, start + c)
                z = z_all[seg] if self.share_v else h[seg] @ self.down_v[e].T
                out[seg] = z @ self.down_u[e].T
                start += c
        return out

    def _add_gate_up_deltas_grouped(self, gate_up, x_pairs, offsets) -> None:
        """Add gate/up deltas of expert-sorted pairs into `gate_up` with grouped matmuls (no loop, no sync)."""
        i, rg = self.intermediate, self.ranks["gate"]
        if self.share_v:
            z = x_pairs @ self.gate_up_v[0].T
        else:
            z = _grouped_mm(x_pairs, self.gate_up_v.transpose(1, 2), offsets)
        gate_up[:, :i] += _grouped_mm(z[:, :rg].contiguous(), self.gate_u.transpose(1, 2), offsets)
        gate_up[:, i:] += _grouped_mm(z[:, rg:].contiguous(), self.up_u.transpose(1, 2), offsets)

    def _down_delta_grouped(self, h, offsets):
        z = h @ self.down_v[0].T if self.share_v else _grouped_mm(h, self.down_v.transpose(1, 2), offsets)
        return _grouped_mm(z.contiguous(), self.down_u.transpose(1, 2), offsets)

    def _down_column_norms(self) -> torch.Tensor:
        """`‖W_down_base[:, j]‖` (cached until the parameter changes)."""
        key = (self.base_down.data_ptr(), self.base_down._version, self.base_down.device)
        if getattr(self, "_norm_key", None) != key:
            self._norm_cache, self._norm_key = self.base_down.detach().float().norm(dim=0), key
        return self._norm_cache

    def _dynamic_mask(self, aggregated: torch.Tensor) -> torch.Tensor | None:
        """0/1 mask of the channels kept (Eq. 9), or None: `[T, I]` per token (scope "token"), or `[I]`
        for the whole batch (scope "batch", the paper's)."""
        if self.dynamic_channels <= 0 or self.dynamic_channels >= self.intermediate:
            return None
        if self.dynamic_scope == "batch":
            score = self._down_column_norms() * aggregated.float().norm(dim=0)
            drop = torch.topk(score, self.dynamic_channels, largest=False, sorted=False).indices
            return torch.ones(self.intermediate, dtype=aggregated.dtype, device=aggregated.device).index_fill_(0, drop, 0)
        score = self._down_column_norms() * aggregated.float().abs()                     # [T, I]
        drop = torch.topk(score, self.dynamic_channels, dim=-1, largest=False, sorted=False).indices
        return torch.ones_like(aggregated).scatter_(-1, drop, 0)

    def _path(self, index: torch.Tensor, x: torch.Tensor) -> str:
        if index.numel() <= GATHER_MAX_PAIRS:
            return "gathered"
        if _grouped_mm is None or x.dtype not in GROUPED_DTYPES or min(self.ranks.values()) == 0:
            return "looped"
        # the grouped kernel needs every row stride to be a multiple of 16 bytes
        dims = (*self.ranks.values(), self.intermediate, x.shape[-1])
        return "grouped" if all(d * x.element_size() % 16 == 0 for d in dims) else "looped"

    def routed(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        path = self._path(index, x)
        if path == "gathered":
            return self._routed_token_major(x, weights.to(x.dtype), index)
        return self._routed_expert_sorted(x, weights.to(x.dtype), index, path)

    def _routed_token_major(self, x, weights, index):
        """Few pairs (decode): gather each pair's factors, no sorting and no scatter."""
        t, k = index.shape
        i = self.intermediate
        expert = index.reshape(-1)
        x_pairs = x.unsqueeze(1).expand(t, k, x.shape[-1]).reshape(t * k, -1)
        gate_up = (x @ self.base_gate_up.T).unsqueeze(1) + self._gate_up_deltas_gathered(x_pairs, expert).view(t, k, -1)
        if self.biased:
            gate_up += self.gate_up_bias[index]
        h = self.gated_activation(gate_up[..., :i], gate_up[..., i:]) * weights.unsqueeze(-1)   # [t, k, I]
        aggregated = h.sum(1)
        mask = self._dynamic_mask(aggregated)
        if mask is not None:
            h, aggregated = h * (mask.unsqueeze(1) if mask.dim() == 2 else mask), aggregated * mask
        down = self._down_delta_gathered(h.reshape(t * k, i), expert).view(t, k, -1)
        if self.biased:
            down = down + weights.unsqueeze(-1) * self.down_bias[index]
        return aggregated @ self.base_down.T + down.sum(1)

    def _routed_expert_sorted(self, x, weights, index, path):
        """Many pairs (prefill): pairs sorted by expert, deltas by grouped matmul or a loop over experts.

        In-place updates where possible: at prefill sizes these passes are memory-bound.
        """
        i = self.intermediate
        token, expert, weight = self._pairs(index, weights, sort=True)
        x_pairs = x.index_select(0, token)
        gate_up = (x @ self.base_gate_up.T).index_select(0, token)              # base once per token
        if path == "grouped":
            offsets = torch.cumsum(torch.bincount(expert, minlength=self.num_experts), 0).to(torch.int32)
            self._add_gate_up_deltas_grouped(gate_up, x_pairs, offsets)
        else:
            counts = torch.bincount(expert, minlength=self.num_experts).tolist()
            gate_up += self._gate_up_deltas_looped(x_pairs, counts)
        if self.biased:
            gate_up += self.gate_up_bias[expert]
        h = self.gated_activation(gate_up[:, :i], gate_up[:, i:])
        h.mul_(weight[:, None])                                                 # routing weight folded in
        aggregated = x.new_zeros(x.shape[0], i).index_add_(0, token, h)
        mask = self._dynamic_mask(aggregated)
        if mask is not None:
            h.mul_(mask.index_select(0, token) if mask.dim() == 2 else mask)
            aggregated.mul_(mask)
        out = aggregated @ self.base_down.T                                      # base down once per token
        down = self._down_delta_grouped(h, offsets) if path == "grouped" else self._down_delta_looped(h, counts)
        if self.biased:
            down += weight[:, None] * self.down_bias[expert]
        return out.index_add_(0, token, down)

KINDS = {DeltaMoeBlock.kind: DeltaMoeBlock}
