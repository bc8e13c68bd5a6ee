"""Compressed Experts block (He et al. 2025, arXiv 2503.00634, §2.2). Ships inside checkpoints.

Per token the router picks its usual top-k experts; sorted by routing weight, the first `k_main`
are *main* experts (computed in full) and the other `n_ce = k - k_main` are *auxiliary* experts,
which are not computed: each expert i owns a compressed expert (learned vectors), and the
auxiliary experts' vectors are aggregated with renormalised routing weights

    theta = sum_{i aux} a'_i theta_i,      a'_i = a_i / sum_{j aux} a_j

and then scale the main experts IA3-style (released-code variant, not the paper's single vector):

    E_i^CE(x) = W_D,i( g(W_G,i (x * theta_gate), W_U,i (x * theta_up)) * theta_mid )
    y = sum_{i main} a_i E_i^CE(x)                  (original, not renormalised, weights a_i)

Storage (a documented deviation from the code's `ces [N, 3, H]` whose intermediate vector is the
slice `[:I]` of a hidden-size vector, invalid when I > H as in Phi-3.5-MoE):
`ce_input [N, 2, H]` (gate-input and up-input vectors) and `ce_intermediate [N, I]`. The unused
tail `[I:H]` of the code's second vector never gets a gradient there, so the functions are equal;
we store 2H + I numbers per expert instead of 3H (the paper's Phi count `2*4096 + 6400`).
All vectors start at one, so before training the block equals top-`k_main` routing with the
original weights.

Optional *auxiliary mini-experts* (`aux_width=r`, our addition, not in the paper; docs/algorithms.md#compressed_experts
notes the paper has no training-free variant): each expert i also owns a width-`r` SwiGLU
`m_i(x) = D_i g(G_i x, U_i x) + b_i` (`aux_gate_up [N, 2r, H]` gate rows first,
`aux_down [N, H, r]`, `aux_bias [N, H]`; `aux_gate_up_bias [N, 2r]` for families with expert
biases), and every auxiliary expert adds its mini-expert with its original routing weight:
`y = sum_{i main} a_i E_i^CE(x) + sum_{j aux} a_j m_j(x)`. `methods/compressed_experts` fits them
before any training (the expert's most important neurons, down columns and bias refitted by least
squares on the tokens where the expert is auxiliary). Zero-initialised they add nothing; with
`r = I` and the expert's own weights the block is the stock top-k block again.

The routed experts stay the stock fused `experts` module (same checkpoint keys); only the compute
changes. Imports only torch and transformers.
"""

from __future__ import annotations

import torch
from torch import nn

from .moepress_common import MoepressBlock


def split_main_auxiliary(weights: torch.Tensor, index: torch.Tensor, k_main: int):
    """Sort each token's top-k by routing weight (descending) and split after `k_main`.

    Args: weights, index `[T, k]`. Returns (main_w, main_i `[T, k_main]`, aux_w, aux_i `[T, k - k_main]`).
    """
    order = weights.argsort(dim=-1, descending=True, stable=True)
    weights, index = weights.gather(-1, order), index.gather(-1, order)
    return weights[:, :k_main], index[:, :k_main], weights[:, k_main:], index[:, k_main:]


def aggregate_compressed(vectors: torch.Tensor, aux_weights: torch.Tensor, aux_index: torch.Tensor) -> torch.Tensor:
    """`theta_t = sum_a a'_ta vectors[aux_index_ta]` with `a' = a / sum_a a` (paper §2.2, step 3).

    Args: vectors `[N, *S]`, aux_weights/aux_index `[T, n]`. Returns `[T, *S]`.
    One gather and one batched product for all tokens (no loop); symmetric in the auxiliary
    experts, so their order never matters.
    """
    coeff = aux_weights / aux_weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(aux_weights.dtype).tiny)
    tokens, n = aux_index.shape
    flat = vectors.reshape(vectors.shape[0], -1)
    # index_select, not advanced indexing: on CPU the latter was ~20x slower here (profiled)
    gathered = flat.index_select(0, aux_index.reshape(-1)).view(tokens, n, flat.shape[1])  # [T, n, D]
    out = torch.bmm(coeff.to(flat.dtype).unsqueeze(1), gathered).squeeze(1)  # [T, D]
    return out.view(tokens, *vectors.shape[1:])


def _grouped_mm_usable(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch's grouped GEMM needs a unit stride in one of b's last two dims and 16-byte strides."""
    if not hasattr(torch.nn.functional, "grouped_mm") or a.dtype != b.dtype:
        return False
    if 1 not in b.stride()[-2:]:
        return False
    size = b.element_size()
    strides = [s for s in (*a.stride(), *b.stride()) if s != 1]
    return all(s * size % 16 == 0 for s in strides) and a.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0


def grouped_matmul(x: torch.Tensor, weight_t: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of `x [S, K]` grouped by expert (expert e owns rows `offsets[e-1]:offsets[e]`) times
    `weight_t [E, K, N]` of their expert -> `[S, N]`.

    One grouped GEMM (`torch.nn.functional.grouped_mm`, what the stock experts run) when torch has
    it and the layouts allow it; else one matmul per expert that has rows.
    """
    if _grouped_mm_usable(x, weight_t):
        return torch.nn.functional.grouped_mm(x, weight_t, offs=offsets.to(torch.int32))
    out = x.new_empty(x.shape[0], weight_t.shape[-1])
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ weight_t[e]
        start = end
    return out


def stacked_gate_up(gate_up: torch.Tensor, expert_ids: torch.Tensor, offsets: torch.Tensor, x_gate: torch.Tensor,
                    x_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate and up pre-activations `[S, I]` each from ONE grouped GEMM with the fused `gate_up [E, 2I, H]`.

    Each expert's rows are stacked `[x_gate rows; x_up rows]` and multiplied by its whole fused
    weight; the gate half of the gate rows and the up half of the up rows are kept. Twice the
    arithmetic of two separate products, but one GEMM per expert instead of two: for a few rows per
    expert (decoding) the calls, not the arithmetic, are the cost (profiled on CPU, where the grouped
    GEMM is a loop over all experts).
    """
    s, i = x_gate.shape[0], gate_up.shape[1] // 2
    starts = torch.cat([offsets.new_zeros(1), offsets[:-1]])
    counts = offsets - starts
    pair = torch.arange(s, device=x_gate.device)
    gate_rows = starts.index_select(0, expert_ids) + pair  # expert e's block starts at 2·start_e
    up_rows = gate_rows + counts.index_select(0, expert_ids)
    stacked = x_gate.new_empty(2 * s, x_gate.shape[1]).index_copy_(0, gate_rows, x_gate).index_copy_(0, up_rows, x_up)
    both = grouped_matmul(stacked, gate_up.transpose(-2, -1), 2 * offsets)  # [2S, 2I]
    return both.index_select(0, gate_rows)[:, :i], both.index_select(0, up_rows)[:, i:]


#: Pairs per expert below which `stacked_gate_up` is used (few rows: calls dominate).
STACKED_ROWS_PER_EXPERT = 4


def grouped_compressed_experts(expert_format, experts: nn.Module, expert_ids: torch.Tensor, x_gate: torch.Tensor,
                               x_up: torch.Tensor, mid_scale: torch.Tensor | None) -> torch.Tensor:
    """`E_e^CE` for (token, expert) pairs sorted by expert: `W_D,e( g(W_G,e x_gate + b, W_U,e x_up + b) * mid )`.

    Args:
        expert_format: the family's `ExpertFormat`; experts: the stock fused experts module.
        expert_ids: `[S]` expert of each pair, non-decreasing; x_gate, x_up: `[S, H]` the inputs of
            the gate and up projections; mid_scale: `[S, I]` or None.
    Returns: `[S, H]` expert outputs (no routing weight). Grouped GEMMs over all pairs at once, on
    views of the stored weights (never copied): gate, up, down (many pairs per expert), or stacked
    gate+up and down (few pairs per expert, fused layouts: `stacked_gate_up`).
    """
    biases = (experts.gate_up_proj_bias, experts.down_proj_bias) if expert_format.biased else (None, None)
    w = expert_format.unpack(experts.gate_up_proj, experts.down_proj, *biases)
    num_experts = w["gate"].shape[0]
    experts_range = torch.arange(num_experts, device=expert_ids.device, dtype=expert_ids.dtype)
    offsets = torch.searchsorted(expert_ids, experts_range, right=True)  # end row of each expert
    if not expert_format.interleaved and expert_ids.shape[0] < STACKED_ROWS_PER_EXPERT * num_experts:
        gate, up = stacked_gate_up(experts.gate_up_proj, expert_ids, offsets, x_gate, x_up)
    else:
        gate = grouped_matmul(x_gate, w["gate"].transpose(-2, -1), offsets)
        up = grouped_matmul(x_up, w["up"].transpose(-2, -1), offsets)
    if w["gate_bias"] is not None:
        gate = gate + w["gate_bias"].index_select(0, expert_ids)
        up = up + w["up_bias"].index_select(0, expert_ids)
    h = expert_format.activation(gate, up)
    if mid_scale is not None:
        h = h * mid_scale
    out = grouped_matmul(h, w["down"].transpose(-2, -1), offsets)
    if w["down_bias"] is not None:
        out = out + w["down_bias"].index_select(0, expert_ids)
    return out


class CompressedExpertsBlock(MoepressBlock):
    """Top-`k_main` experts computed, the remaining `k - k_main` replaced by compressed vectors.

    Args:
        stock: the family's stock MoE block; its router, shared experts and fused `experts`
            module are adopted (not copied).
        config: the model config.
        k_main: main experts per token, `1 <= k_main <= num_experts_per_tok`.
        aux_width: width of each expert's auxiliary mini-expert (module doc), None = none (the paper).
    """

    kind = "compressed_experts"

    def __init__(self, stock: nn.Module, config, k_main: int, aux_width: int | None = None):
        super().__init__(stock, config)
        if not 1 <= int(k_main) <= self.top_k:
            raise ValueError(f"k_main must be between 1 and top-k={self.top_k}, got {k_main}")
        self.experts = stock.experts
        self.k_main = int(k_main)
        w = self.experts.gate_up_proj
        self.num_experts = w.shape[0]
        self.intermediate_size = self.expert_format.unpack(w)["gate"].shape[1]
        kw = dict(dtype=w.dtype, device=w.device)
        self.ce_input = nn.Parameter(torch.ones(self.num_experts, 2, self.hidden_size, **kw))
        self.ce_intermediate = nn.Parameter(torch.ones(self.num_experts, self.intermediate_size, **kw))
        self.aux_width = None if aux_width is None else int(aux_width)
        if self.aux_width is not None:
            if not 0 <= self.aux_width <= self.intermediate_size:
                raise ValueError(f"aux_width must be between 0 and the expert width {self.intermediate_size}, "
                                 f"got {aux_width}")
            n, r, h = self.num_experts, self.aux_width, self.hidden_size
            self.aux_gate_up = nn.Parameter(torch.zeros(n, 2 * r, h, **kw))  # gate rows, then up rows
            self.aux_down = nn.Parameter(torch.zeros(n, h, r, **kw))
            self.aux_bias = nn.Parameter(torch.zeros(n, h, **kw))
            if self.biased:
                self.aux_gate_up_bias = nn.Parameter(torch.zeros(n, 2 * r, **kw))

    @property
    def n_ce(self) -> int:
        return self.top_k - self.k_main

    def routed(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """All (token, main expert) pairs in one pass: sorted by expert, grouped GEMMs, summed back.

        No Python loop over tokens or experts (the per-expert loop of the first version made CE
        prefill slower than the stock block although it computes half the experts).
        """
        main_w, main_i, aux_w, aux_i = split_main_auxiliary(weights, index, self.k_main)
        tokens, k_main = main_i.shape
        expert_ids, order = torch.sort(main_i.reshape(-1), stable=True)
        token = torch.div(order, k_main, rounding_mode="floor")
        xs = x.index_select(0, token)  # index_select: CPU advanced indexing was ~20x slower (profiled)
        x_gate = x_up = xs
        mid_scale = None
        if aux_i.shape[1] > 0:
            in_scale = aggregate_compressed(self.ce_input, aux_w, aux_i).index_select(0, token)  # [S, 2, H]
            x_gate, x_up = xs * in_scale[:, 0], xs * in_scale[:, 1]
            mid_scale = aggregate_compressed(self.ce_intermediate, aux_w, aux_i).index_select(0, token)  # [S, I]
        y = grouped_compressed_experts(self.expert_format, self.experts, expert_ids, x_gate, x_up, mid_scale)
        y = y * main_w.reshape(-1).index_select(0, order).unsqueeze(-1).to(y.dtype)
        pairs = torch.empty_like(y).index_copy_(0, order, y)  # back to (token, slot) order
        out = pairs.view(tokens, k_main, x.shape[-1]).sum(dim=1).to(x.dtype)  # deterministic sum over slots
        if self.aux_width is not None and aux_i.shape[1] > 0:
            out = out + self.auxiliary(x, aux_w, aux_i)
        return out

    def auxiliary(self, x: torch.Tensor, aux_w: torch.Tensor, aux_i: torch.Tensor) -> torch.Tensor:
        """`sum_{j aux} a_j m_j(x)` `[T, H]`: the (token, auxiliary expert) pairs sorted by expert,
        width-`aux_width` grouped GEMMs (the main experts' machinery), weighted and summed back.
        With few pairs per expert (decoding) each pair's small weights are gathered instead and
        multiplied in one batched product: the per-expert calls, not the arithmetic, are the cost."""
        tokens, n = aux_i.shape
        expert_ids, order = torch.sort(aux_i.reshape(-1), stable=True)
        out = self.aux_bias.index_select(0, expert_ids)  # [S, H]
        if self.aux_width > 0:
            token = torch.div(order, n, rounding_mode="floor")
            xs = x.index_select(0, token).to(self.aux_gate_up.dtype)
            few = expert_ids.shape[0] < STACKED_ROWS_PER_EXPERT * self.num_experts
            if few:  # decoding: gather each pair's small weights, one batched product (no per-expert calls)
                both = torch.bmm(self.aux_gate_up.index_select(0, expert_ids), xs.unsqueeze(-1)).squeeze(-1)
            else:
                experts_range = torch.arange(self.num_experts, device=expert_ids.device, dtype=expert_ids.dtype)
                offsets = torch.searchsorted(expert_ids, experts_range, right=True)
                both = grouped_matmul(xs, self.aux_gate_up.transpose(-2, -1), offsets)  # [S, 2R]: one GEMM
            if self.biased:
                both = both + self.aux_gate_up_bias.index_select(0, expert_ids)
            h = self.expert_format.activation(both[:, :self.aux_width], both[:, self.aux_width:])
            if few:
                out = out + torch.bmm(self.aux_down.index_select(0, expert_ids), h.unsqueeze(-1)).squeeze(-1)
            else:
                out = out + grouped_matmul(h, self.aux_down.transpose(-2, -1), offsets)
        out = out * aux_w.reshape(-1).index_select(0, order).unsqueeze(-1).to(out.dtype)
        pairs = torch.empty_like(out).index_copy_(0, order, out)
        return pairs.view(tokens, n, x.shape[-1]).sum(dim=1).to(x.dtype)

    # ------------------------------------------------------------------ export / accounting
    @classmethod
    def from_layer_config(cls, stock: nn.Module, config, layer_cfg: dict) -> "CompressedExpertsBlock":
        aux_width = layer_cfg.get("aux_width")
        return cls(stock, config, k_main=int(layer_cfg["k_main"]), aux_width=None if aux_width is None else int(aux_width))

    def layer_config(self) -> dict:
        cfg = {
            "kind": self.kind, "k_main": self.k_main, "top_k": self.top_k,
            "num_experts": self.num_experts, "intermediate_size": self.intermediate_size,
        }
        if self.aux_width is not None:
            cfg["aux_width"] = self.aux_width
        return cfg


    def moepress_parameter_counts(self) -> tuple[int, int, int]:
        """(routed parameters stored incl. vectors, routed parameters active per token, experts).

        Active = `k_main` full experts + the `n_ce` auxiliary experts' vectors (read per token) and,
        with `aux_width`, their mini-experts.
        """
        expert = self.expert_format.parameters_per_expert(self.hidden_size, self.intermediate_size)
        # the block's own parameters (router and experts are children) are all per-expert: vectors + mini-expert
        compressed = sum(p.numel() for p in self.parameters(recurse=False)) // self.num_experts
        stored = self.num_experts * (expert + compressed)
        return stored, self.k_main * expert + self.n_ce * compressed, self.num_experts


KINDS = {CompressedExpertsBlock.kind: CompressedExpertsBlock}
