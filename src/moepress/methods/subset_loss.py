"""The expert-subset objective of NAEE (Lu et al. 2024, §3.1) and of MoE-I²'s stage 1.

With MoE_S the layer whose router is restricted to the experts S (rows sliced, as in the saved
checkpoint), `L(S) = Σ_x ‖MoE(x) − MoE_S(x)‖²` over calibration tokens. Shared experts are
identical on both sides and cancel, so only the routed part is compared. Where the routing cannot
run on |S| experts (DeepSeek group-limited routing needs the count divisible by `n_group`), the
removed experts' weighted outputs are dropped from the original routing instead (no re-routing):
an upper-bound proxy used only for such counts.

How it is evaluated: a search scores thousands of subsets on the same tokens, so every expert's
output is computed once and reduced, per token, to its inner products with the layer's output and
with the other experts' outputs (`ops.saliency.output_products`, `[T, E]` and `[T, E, E]` float64).
A subset then costs its routing plus a gather of `[T, k, k]` values (`subset_squared_error`),
where the direct form gathered and summed `[T, k, H]` outputs (on a random Qwen3-MoE of
qwen3-ref's shape, 32 x 256 tokens: MoE-I² 345 s -> 85 s, NAEE 34 s -> 22 s, the same subsets);
and the `[E, T, H]` outputs are not held (at the width of Qwen3-30B-A3B and 8192 tokens: 1 GiB of
products instead of 8.6 GB of outputs).

Data parallel: `L` is a sum over tokens. Each rank holds its own tokens (possibly none), and every
loss and energy is summed over ranks by `reduce` (`LayerStatistics.reduce`), so all ranks walk
the same search.
"""

from __future__ import annotations

import torch

from ..arch import MoELayerView, validate_expert_count
from ..ops.saliency import output_products, subset_squared_error

#: tokens whose expert outputs are held at once while the products are formed
CHUNK_TOKENS = 1024


def _identity(value):
    return value


class SubsetLoss:
    """`L(S)` on tokens `x [T, H]` (this rank's; `T` may be 0), summed over ranks by `reduce`."""

    def __init__(self, view: MoELayerView, x: torch.Tensor, reduce=_identity, chunk_tokens: int = CHUNK_TOKENS):
        self.view, self.x, self.reduce = view, x, reduce
        self.empty = x.shape[0] == 0
        if self.empty:  # this rank holds none of the tokens: it only takes part in the sums
            self.energy = float(reduce(0.0))
            return
        with torch.no_grad():
            routing = view.route(x)
            self.weights, self.index = routing.weights, routing.index
            products, grams, energy = [], [], 0.0
            for rows in torch.arange(x.shape[0], device=x.device).split(chunk_tokens):
                xc = x[rows]
                outputs = torch.stack([view.expert(j, xc) for j in range(view.num_experts)])  # [E, c, H]
                full = view.experts(xc, routing.index[rows], routing.weights[rows])
                p, g = output_products(outputs, full)
                products.append(p)
                grams.append(g)
                energy += float(full.double().pow(2).sum())
                del outputs
            self.products, self.pair_grams = torch.cat(products), torch.cat(grams)
        self.local_energy = energy
        self.energy = float(reduce(energy))

    def routable(self, count: int) -> bool:
        try:
            validate_expert_count(self.view.config, count)
            return True
        except ValueError:
            return False

    def squared_error(self, subset: list[int]) -> float:
        """`L(subset)` over every rank's tokens (the subset must hold at least top-k experts)."""
        return float(self.reduce(self.local_squared_error(subset)))

    def local_squared_error(self, subset: list[int]) -> float:
        """`L(subset)` over this rank's tokens."""
        if self.empty:
            return 0.0
        with torch.no_grad():
            kept = torch.as_tensor(subset, device=self.x.device)
            if self.routable(len(subset)):
                _, weights, index = self.view.subset_router(subset)(self.x)
                experts = kept[index]
            else:
                mask = torch.zeros(self.view.num_experts, dtype=torch.bool, device=self.x.device)
                mask[kept] = True
                weights, experts = self.weights * mask[self.index], self.index
            return subset_squared_error(self.local_energy, self.products, self.pair_grams, weights, experts)

    def removal_errors(self, kept: list[int]) -> torch.Tensor:
        """For each expert of `kept`, the squared error of keeping `kept` without it `[len(kept)]`
        (inf when fewer than top-k experts would remain)."""
        if len(kept) - 1 < self.view.top_k:
            return torch.full((len(kept),), float("inf"), dtype=torch.float64)
        return torch.tensor([self.squared_error([e for e in kept if e != j]) for j in kept], dtype=torch.float64)
