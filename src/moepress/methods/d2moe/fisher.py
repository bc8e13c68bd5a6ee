"""Empirical Fisher of the routed experts and the Fisher-merged bases (D²-MoE §3.2, Eq. 4–5).

`F = E[(∂ℓ/∂W)²]` element-wise, ℓ the next-token cross-entropy on a calibration batch (empirical
Fisher with the true labels, as in the released `get_fisher.py`), accumulated in float32.

Bounded memory: the MoE layers are processed in chunks of `chunk_layers`; for each chunk only
that chunk's routed-expert weights require grad, so the backward pass stops at the chunk's first
layer and holds gradients only for them. Peak extra memory =
    2 × (routed-expert parameters of one chunk) in float32   (accumulator + grad)
  + the activations of one calibration batch from the chunk's first layer to the loss,
and after each chunk the Fisher is reduced at once to one base per layer and projection
(`E×` smaller), so nothing of size "all experts" is ever held. Cost: one forward+backward per
batch per chunk. Usage frequencies are counted with the model's own routers on the first chunk's
forward passes (the original model, as in the released `get_expert_freq.py`).

Deviation: the model stays in eval mode (no dropout); the released code used train mode.

Data parallel (`torchrun`): each rank takes its contiguous shard of the Fisher sequences; the
squared-gradient sums, the batch counts and the routing counts are summed over ranks before the
division, so the Fisher is the single-process one whenever the batches are the same — always
with the default `fisher_batch_size=1`, otherwise when each rank's share is a multiple of it.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from ... import distributed
from ...arch import MoELayerView, moe_layer_views
from ...ops.fisher_merge import fisher_merge

PROJECTIONS = ("gate", "up", "down")


def calibration_ids(calibration, limit: int | None = None) -> torch.Tensor:
    """The `[n, L]` LongTensor of packed calibration sequences (`calibration.input_ids` or a tensor)."""
    ids = getattr(calibration, "input_ids", calibration)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError("D²-MoE's Fisher needs calibration token ids as a [sequences, length] tensor")
    return ids[:limit] if limit else ids


def _expert_params(view: MoELayerView) -> list[nn.Parameter]:
    return [view.experts.gate_up_proj, view.experts.down_proj]


def _split(view: MoELayerView, fused: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split stored-layout tensors (like `gate_up_proj`, `down_proj`) into gate/up/down `[E, out, in]`."""
    unpacked = view.expert_format.unpack(fused[0], fused[1])
    return {p: unpacked[p] for p in PROJECTIONS}


def _count_routing(views: list[MoELayerView], counts: dict[int, torch.Tensor]):
    """Forward hooks on the routers adding top-k membership counts into `counts[layer]`."""

    def hook_for(layer: int, num: int):
        def hook(_module, _inputs, output):
            index = output[-1]
            counts[layer] += torch.bincount(index.reshape(-1).cpu(), minlength=num).double()

        return hook

    return [v.router.register_forward_hook(hook_for(v.layer_index, v.num_experts)) for v in views]


def _accumulate_chunk(model, ids, batch_size, chunk, counts, count_now) -> list[list[torch.Tensor]]:
    params = [p for v in chunk for p in _expert_params(v)]
    acc = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    hooks = _count_routing(list(counts.views), counts.table) if count_now else []
    device = params[0].device
    try:
        for p in params:
            p.requires_grad_(True)
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start:start + batch_size].to(device)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            grads = torch.autograd.grad(loss, params)
            for a, g in zip(acc, grads):
                a.add_(g.float().square())
    finally:
        for p in params:
            p.requires_grad_(False)
        for h in hooks:
            h.remove()
    steps = distributed.all_reduce_number((ids.shape[0] + batch_size - 1) // batch_size)
    distributed.all_reduce_tree(acc)  # squared-gradient sums over data-parallel ranks
    if count_now:
        distributed.all_reduce_tree(list(counts.table.values()))
    return [[a / steps for a in acc[2 * i:2 * i + 2]] for i in range(len(chunk))]


def fisher_bases(model: nn.Module, ids: torch.Tensor, batch_size: int = 1, chunk_layers: int = 4) -> dict:
    """Fisher × frequency merged bases of every MoE layer of the ORIGINAL model.

    Args:
        model: the model (not modified; grad flags are restored to False for all parameters).
        ids: `[n, L]` calibration token ids (all of them; a data-parallel rank uses its shard).
        batch_size: sequences per forward/backward; chunk_layers: MoE layers per gradient pass.
    Returns:
        `{layer_index: {"gate"|"up"|"down": base [out, in] float32 on CPU, "frequency": [E] float64}}`.
    """
    views = moe_layer_views(model)
    ids = ids[distributed.shard_slice(ids.shape[0])]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    counts = SimpleNamespace(views=views, table={v.layer_index: torch.zeros(v.num_experts, dtype=torch.float64) for v in views})
    out = {}
    try:
        for start in range(0, len(views), chunk_layers):
            chunk = views[start:start + chunk_layers]
            fishers = _accumulate_chunk(model, ids, batch_size, chunk, counts, count_now=start == 0)
            for view, fused in zip(chunk, fishers):
                freq = counts.table[view.layer_index]
                weights = {"gate": view.gate_proj, "up": view.up_proj, "down": view.down_proj}
                split = _split(view, fused)
                out[view.layer_index] = {
                    p: fisher_merge(weights[p].detach(), split[p], freq).float().cpu() for p in PROJECTIONS
                }
                out[view.layer_index]["frequency"] = freq
            del fishers
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    return out
