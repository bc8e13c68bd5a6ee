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
original weights. The routed experts stay the stock fused `experts` module (same checkpoint
keys); only the compute changes. Imports only torch and transformers.
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
    Symmetric in the auxiliary experts, so their order never matters.
    """
    coeff = aux_weights / aux_weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(aux_weights.dtype).tiny)
    gathered = vectors[aux_index]  # [T, n, *S]
    coeff = coeff.to(gathered.dtype).reshape(*coeff.shape, *([1] * (gathered.dim() - 2)))
    return (coeff * gathered).sum(dim=1)


class CompressedExpertsBlock(MoepressBlock):
    """Top-`k_main` experts computed, the remaining `k - k_main` replaced by compressed vectors.

    Args:
        stock: the family's stock MoE block; its router, shared experts and fused `experts`
            module are adopted (not copied).
        config: the model config.
        k_main: main experts per token, `1 <= k_main <= num_experts_per_tok`.
    """

    kind = "compressed_experts"

    def __init__(self, stock: nn.Module, config, k_main: int):
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

    @property
    def n_ce(self) -> int:
        return self.top_k - self.k_main

    def _expert(self, j: int, x_gate, x_up, mid_scale):
        """Expert j on `[t, H]` inputs already scaled for its gate and up projections."""
        return self.expert_format.forward(x_gate, **self.expert_format.stored_expert(self.experts, j),
                                          x_up=x_up, mid_scale=mid_scale)

    def routed(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        main_w, main_i, aux_w, aux_i = split_main_auxiliary(weights, index, self.k_main)
        in_scale = mid_scale = None
        if aux_i.shape[1] > 0:
            in_scale = aggregate_compressed(self.ce_input, aux_w, aux_i)  # [T, 2, H]
            mid_scale = aggregate_compressed(self.ce_intermediate, aux_w, aux_i)  # [T, I]
        out = torch.zeros_like(x)
        for j in torch.unique(main_i).tolist():
            token, slot = torch.where(main_i == j)
            xj = x[token]
            if in_scale is None:
                y = self._expert(j, xj, None, None)
            else:
                y = self._expert(j, xj * in_scale[token, 0], xj * in_scale[token, 1], mid_scale[token])
            out.index_add_(0, token, (y * main_w[token, slot, None]).to(out.dtype))
        return out

    # ------------------------------------------------------------------ export / accounting
    @classmethod
    def from_layer_config(cls, stock: nn.Module, config, layer_cfg: dict) -> "CompressedExpertsBlock":
        return cls(stock, config, k_main=int(layer_cfg["k_main"]))

    def layer_config(self) -> dict:
        return {
            "kind": self.kind, "k_main": self.k_main, "top_k": self.top_k,
            "num_experts": self.num_experts, "intermediate_size": self.intermediate_size,
        }

    def moepress_parameter_counts(self) -> tuple[int, int, int]:
        """(routed parameters stored incl. vectors, routed parameters active per token, experts).

        Active = `k_main` full experts + the `n_ce` auxiliary experts' vectors (read per token).
        """
        expert = self.expert_format.parameters_per_expert(self.hidden_size, self.intermediate_size)
        vectors = (self.ce_input.numel() + self.ce_intermediate.numel()) // self.num_experts
        stored = self.num_experts * (expert + vectors)
        return stored, self.k_main * expert + self.n_ce * vectors, self.num_experts


KINDS = {CompressedExpertsBlock.kind: CompressedExpertsBlock}
