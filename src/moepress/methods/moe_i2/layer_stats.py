"""Calibration quantities of MoE-I²: subset reconstruction losses and per-expert Grams.

`SubsetLoss` (methods/subset_loss.py) is the stage-1 objective, NAEE's: `Σ_x ‖MoE(x) − MoE_S(x)‖²`
over the calibration tokens for a kept subset S.

Data parallel: both are sums over tokens. Each rank holds its own tokens (possibly none of the first
`max_tokens`), and every loss, energy and Gram is summed over ranks by `reduce`
(`LayerStatistics.reduce`) before it is compared, so all ranks walk the same search.
"""

from __future__ import annotations

import torch

from ...arch import MoELayerView
from ..subset_loss import SubsetLoss, _identity

__all__ = ["SubsetLoss", "removal_importance", "routed_grams"]


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
