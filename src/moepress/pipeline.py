"""The layer-wise loop (DESIGN.md §2): onload layer -> statistics -> method -> propagate -> offload.

Calibration hidden states are captured at the input of decoder layer 0, then every layer is run
on them in turn. At an MoE layer the block's inputs (post-attention-norm hidden states) are
collected, the method compresses the block, and the *compressed* layer produces the next layer's
inputs ("sequential" propagation, as NAEE's layer-wise pruning; D²-MoE's `get_scale.py` propagates
through the original model instead — ALGORITHMS.md §6 asks us to record which: we record
`propagation: "compressed"` in moepress.json).

Peak memory = one decoder layer + the hidden states of the calibration tokens + one layer's MoE
inputs + the method's accumulators, independent of depth when a streaming `LayerStore` is used.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from .arch import decoder_layers, layer_view, moe_layer_indices, set_moe_block
from .calib import CalibrationSet, LayerStatistics
from .methods import LayerContext, Method


class _StopForward(Exception):
    pass


def capture_layer_inputs(model: nn.Module, calibration: CalibrationSet, batch_size: int):
    """Inputs of decoder layer 0 for every calibration batch, and each layer's keyword arguments.

    Decoder layers are temporarily replaced by recorders (their weights are never touched, so
    this works on a model whose layers live on the meta device). Returns `(hidden, kwargs)` where
    `hidden` is a list of `[b, L, H]` tensors and `kwargs[(layer_index, b)]` holds the rotary
    embeddings and attention mask that layer receives for a batch of `b` sequences.
    """
    layers = decoder_layers(model)
    hidden: list[torch.Tensor] = []
    kwargs: dict[tuple[int, int], dict] = {}
    last = len(layers) - 1

    def recorder(index):
        def forward(hidden_states, *args, **kw):
            b = hidden_states.shape[0]
            if index == 0:
                hidden.append(hidden_states.detach())
            if (index, b) not in kwargs:
                kw = {k: v for k, v in kw.items() if k not in ("past_key_values", "use_cache")}
                kwargs[(index, b)] = {**kw, "use_cache": False}
            elif index == 0:
                raise _StopForward  # other layers' kwargs for this batch size are known already
            if index == last:
                raise _StopForward
            return hidden_states

        return forward

    originals = {}
    for i, layer in enumerate(layers):
        originals[i] = layer.__dict__.get("forward")
        layer.forward = recorder(i)
    device = next(p.device for p in model.get_input_embeddings().parameters())
    try:
        with torch.no_grad():
            for ids in calibration.batches(batch_size):
                try:
                    model(input_ids=ids.to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        for i, layer in enumerate(layers):
            if originals[i] is None:
                del layer.forward
            else:
                layer.forward = originals[i]
    return hidden, kwargs


def run_layer(layer: nn.Module, index: int, hidden: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor]:
    """Run decoder layer `index` on every batch of hidden states."""
    out = []
    with torch.no_grad():
        for h in hidden:
            y = layer(h, **kwargs[(index, h.shape[0])])
            out.append(y[0] if isinstance(y, tuple) else y)
    return out


def collect_block_inputs(layer: nn.Module, block: nn.Module, index: int, hidden, kwargs) -> list[torch.Tensor]:
    """Flat inputs `[b*L, H]` of the MoE block of `layer` for every batch (one layer forward each)."""
    captured: list[torch.Tensor] = []

    def hook(module, args):
        captured.append(args[0].detach().reshape(-1, args[0].shape[-1]))
        raise _StopForward  # the rest of the layer is not needed

    handle = block.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for h in hidden:
                try:
                    layer(h, **kwargs[(index, h.shape[0])])
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return captured


class InMemoryLayers:
    """Layer store for a model that is fully resident: onload/offload only move devices."""

    def __init__(self, model: nn.Module, device: str | torch.device | None = None):
        self.model = model
        self.device = device

    def onload(self, index: int) -> nn.Module:
        layer = decoder_layers(self.model)[index]
        return layer.to(self.device) if self.device is not None else layer

    def offload(self, index: int, record: dict | None = None) -> None:
        if self.device is not None:
            decoder_layers(self.model)[index].to("cpu")

    def load_original(self, index: int) -> nn.Module:
        """Layer `index` with its source weights (before the layer loop: the layer itself)."""
        return self.onload(index)

    def release(self, index: int) -> None:
        """Put back a layer from `load_original` (nothing is written)."""
        self.offload(index)


def compress_layers(model: nn.Module, method: Method, calibration: CalibrationSet, *,
                    batch_size: int = 8, store=None, progress: Callable | None = None) -> dict[int, dict]:
    """Run `method` over every MoE layer of `model`; returns `{layer index: record}`.

    Args:
        store: a layer store with `onload(i) -> layer` / `offload(i)` (and `load_original(i)` /
            `release(i)` for passes over the original model in `Method.prepare`); default `InMemoryLayers`.
        progress: optional callback `progress(done, total, description)`.
    """
    if store is not None and getattr(method, "requires_resident_model", False):
        raise ValueError(f"method {method.name!r} needs the whole model in memory (e.g. for gradients); "
                         f"run it without offload")
    store = store or InMemoryLayers(model)
    layers = decoder_layers(model)
    moe = moe_layer_indices(model)
    hidden, kwargs = capture_layer_inputs(model, calibration, batch_size)
    method.prepare(model, calibration, store=store)
    records: dict[int, dict] = {}
    for i in range(len(layers)):
        t0 = time.perf_counter()
        layer = store.onload(i)
        finished = store.finished(i) if hasattr(store, "finished") else None
        if finished is not None:  # resumed: this layer was compressed by an interrupted run
            records[i] = {**finished, "resumed": True}
        elif i in moe:
            view = layer_view(model, i)
            stats = LayerStatistics(view, collect_block_inputs(layer, view.block, i, hidden, kwargs))
            for name in method.needs:  # declared statistics: computed once here, cached for the method
                stats[name]
            ctx = LayerContext(view, stats, moe.index(i), len(moe), model)
            result = method.compress_layer(ctx)
            if result.block is not None:
                set_moe_block(model, i, result.block)
            records[i] = {**result.record, "tokens": stats.num_tokens}
            del stats, ctx, view
        hidden = run_layer(layer, i, hidden, kwargs)
        if i in records and finished is None:
            records[i]["seconds"] = round(time.perf_counter() - t0, 3)
        store.offload(i, records.get(i))
        if progress is not None:
            progress(i + 1, len(layers), f"layer {i + 1}/{len(layers)}")
    method.finalize(model, records)
    return records
