"""Calibration quantities of MoE-I²: subset reconstruction losses and per-expert Grams.

`SubsetLoss` is the stage-1 objective (NAEE's): with MoE_S the layer whose router is restricted to
the experts S (rows sliced, as in the saved checkpoint), `Σ_x ‖MoE(x) − MoE_S(x)‖²` over the
calibration tokens. Shared experts are identical on both sides and cancel, so only the routed part
is compared. Where the routing cannot run on |S| experts (DeepSeek group-limited routing needs
the count divisible by `n_group`), the removed experts' weighted outputs are dropped from the
original routing instead (no re-routing) — an upper-bound proxy used only for such counts.

Data parallel: both are sums over tokens. Each rank holds its own tokens (possibly none of the first
`max_tokens`), and every loss, energy and Gram is summed over ranks by `reduce`
(`LayerStatistics.reduce`) before it is compared, so all ranks walk the same search.
"""

from __future__ import annotations

import torch

from ...arch import MoELayerView, validate_expert_count


def _identity(value):
    return value


class SubsetLoss:
    """Squared error of the routed output when only `subset` experts are kept, on tokens `x [T, H]`
    (this rank's; `T` may be 0), summed over data-parallel ranks by `reduce`."""

    def __init__(self, view: MoELayerView, x: torch.Tensor, reduce=_identity):
        self.view, self.x, self.reduce = view, x, reduce
        self.empty = x.shape[0] == 0
        if self.empty:  # this rank holds none of the tokens: it only takes part in the sums
            self.energy = float(reduce(0.0))
            return
        with torch.no_grad():
            self.outputs = torch.stack([view.expert(j, x) for j in range(view.num_experts)])  # [E, T, H]
            routing = view.route(x)
            self.full = view.routed_output(x, routing).double()
        self.weights, self.index = routing.weights, routing.index
        self.energy = float(reduce(float(self.full.pow(2).sum())))
        self.tokens = torch.arange(x.shape[0], device=x.device).unsqueeze(1)

    def routable(self, count: int) -> bool:
        try:
            validate_expert_count(self.view.config, count)
            return True
        except ValueError:
            return False

    def squared_error(self, subset: list[int]) -> float:
        """`Σ_x ‖MoE(x) − MoE_S(x)‖²` over every rank's tokens (the subset must hold at least top-k experts)."""
        return float(self.reduce(self._local_squared_error(subset)))

    def _local_squared_error(self, subset: list[int]) -> float:
        if self.empty:
            return 0.0
        with torch.no_grad():
            if self.routable(len(subset)):
                _, weights, index = self.view.subset_router(subset)(self.x)
                chosen = self.outputs[torch.as_tensor(subset, device=self.x.device)[index], self.tokens]
            else:
                kept = torch.zeros(self.view.num_experts, dtype=torch.bool, device=self.x.device)
                kept[torch.as_tensor(subset, device=self.x.device)] = True
                weights = self.weights * kept[self.index]
                chosen = self.outputs[self.index, self.tokens]  # [T, k, H]
            approx = (weights.unsqueeze(-1).to(chosen.dtype) * chosen).sum(1).double()
        return float((self.full - approx).pow(2).sum())

    def removal_errors(self, kept: list[int]) -> torch.Tensor:
        """For each expert of `kept`, the squared error of keeping `kept` without it `[len(kept)]`
        (inf when fewer than top-k experts would remain)."""
        if len(kept) - 1 < self.view.top_k:
            return torch.full((len(kept),), float("inf"), dtype=torch.float64)
        return torch.tensor([self.squared_error([e for e in kept if e != j]) for j in kept], dtype=torch.float64)


def removal_importance(model, views: list[MoELayerView], id_batches, max_tokens: int = 8192) -> dict[int, torch.Tensor]:
    """Per MoE layer `[N]`: `Σ‖MoE(x) − MoE_{−j}(x)‖² / Σ‖MoE(x)‖²` for removing expert j alone,
    on the inputs the UNCOMPRESSED model gives the layer (one forward pass over `id_batches`; the
    tokens of a batch are scored `max_tokens` at a time, since all N expert outputs are held)."""
    num = {v.layer_index: torch.zeros(v.num_experts, dtype=torch.float64) for v in views}
    den = {v.layer_index: 0.0 for v in views}

    def hook_for(view):
        def hook(module, args):
            for x in args[0].detach().reshape(-1, args[0].shape[-1]).split(max_tokens):
                loss = SubsetLoss(view, x)
                num[view.layer_index] += loss.removal_errors(list(range(view.num_experts)))
                den[view.layer_index] += loss.energy
        return hook

    handles = [v.block.register_forward_pre_hook(hook_for(v)) for v in views]
    device = next(p.device for p in model.get_input_embeddings().parameters())
    try:
        with torch.no_grad():
            for ids in id_batches:
                model(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {i: num[i] / max(den[i], 1e-300) for i in num}


def routed_grams(view: MoELayerView, batches: list[torch.Tensor], reduce=_identity) -> dict[str, torch.Tensor]:
    """Per expert of `view`, over the tokens its router sends it: `Σ x xᵀ` ("input" `[E, H, H]`) and
    `Σ h hᵀ` of its intermediate activation ("intermediate" `[E, I, I]`), float64 on CPU, summed over
    data-parallel ranks by `reduce`."""
    e, h, i = view.num_experts, view.hidden_size, view.intermediate_size
    gram_in = torch.zeros(e, h, h, dtype=torch.float64)
    gram_mid = torch.zeros(e, i, i, dtype=torch.float64)
    with torch.no_grad():
        for x in batches:
            index = view.route(x).index
            for j in index.unique().tolist():
                xj = x[(index == j).any(dim=-1)]
                gram_in[j] += (xj.double().T @ xj.double()).cpu()
                hj = view.intermediate(j, xj).double()
                gram_mid[j] += (hj.T @ hj).cpu()
    return reduce({"input": gram_in, "intermediate": gram_mid})
