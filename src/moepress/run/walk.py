"""The walk over the decoder layers (docs/architecture.md#the-run), and its primitives.

Every pass of moepress over a model goes one decoder layer at a time, so that memory holds one
layer plus the calibration hidden states, whatever the depth:
- the compression loop (`pipeline.compress_layers`) onloads each layer from its store, lets the
  method compress it and propagates the hidden states through it (or through the source layer);
- every pass over the ORIGINAL layers is `source_layers(store, indices)`: the sensitivity pass of
  `--budget auto` (`plan.measure_sensitivity`), D²-MoE's Fisher forward and backward walks
  (`methods/d2moe/fisher.py`) and the statistics cache's hashing (`cache_keys.py`) are loop bodies
  over it (load_original -> device -> visit -> CPU -> release, the release guaranteed).

The primitives: the inputs of layer 0 and every layer's keyword arguments (`capture_layer_inputs`),
one layer over every batch (`run_layer`), the MoE block's inputs (`collect_block_inputs`) or both at
once (`run_layer_collecting`). Methods import these from here, never from the pipeline.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn

from .. import distributed
from ..arch import decoder_layers
from ..calib import CalibrationSet


def source_layers(store, indices: Iterable[int], device: torch.device | None = None) -> Iterator[tuple[int, nn.Module]]:
    """`(index, layer)` for each ORIGINAL decoder layer in `indices` (any order: the Fisher
    backward walk goes down), one at a time through `store.load_original`, moved to `device` for
    its turn; after the visit it goes back to the CPU and `store.release` frees it, also when the
    visit raises or the loop stops early."""
    for i in indices:
        layer = store.load_original(i)
        try:
            if device is not None:
                layer.to(device)
            yield i, layer
        finally:
            if device is not None and device.type != "cpu":
                layer.to("cpu")
            store.release(i)


def layer_output(y):
    """The hidden states a decoder layer returns (a tuple's first element in transformers versions
    whose layers return tuples)."""
    return y[0] if isinstance(y, tuple) else y


class _StopForward(Exception):
    pass


def local_batches(calibration: CalibrationSet, batch_size: int) -> list[torch.Tensor]:
    """This rank's contiguous shard of the calibration sequences in batches (all of them in one process)."""
    ids = calibration.input_ids[distributed.shard_slice(calibration.input_ids.shape[0])]
    return [ids[i:i + batch_size] for i in range(0, ids.shape[0], batch_size)]


def to_device(value, device: torch.device | None):
    """`value` (a tensor or a dict/list/tuple holding tensors) with its tensors on `device`."""
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


def capture_layer_inputs(model: nn.Module, calibration: CalibrationSet | None, batch_size: int, *,
                         batches: list[torch.Tensor] | None = None):
    """Inputs of decoder layer 0 for every calibration batch of this rank, and each layer's keyword arguments.

    `batches`: exactly these token-id batches instead of this rank's shard of `calibration` in
    batches of `batch_size` (D²-MoE's Fisher deals whole batches to the ranks).

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
            for ids in (local_batches(calibration, batch_size) if batches is None else batches):
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


def run_layer(layer: nn.Module, index: int, hidden: list[torch.Tensor], kwargs: dict,
              device: torch.device | None = None) -> list[torch.Tensor]:
    """Run decoder layer `index` on every batch of hidden states (each batch visits `device` and
    comes back to where it was held)."""
    out = []
    with torch.no_grad():
        for h in hidden:
            y = layer(to_device(h, device), **kwargs[(index, h.shape[0])])
            out.append(layer_output(y).to(h.device))
    return out


def collect_block_inputs(layer: nn.Module, block: nn.Module, index: int, hidden, kwargs,
                         device: torch.device | None = None) -> list[torch.Tensor]:
    """Flat inputs `[b*L, H]` of the MoE block of `layer` for every batch (one layer forward each),
    on the device the layer runs on."""
    captured: list[torch.Tensor] = []

    def hook(module, args):
        captured.append(args[0].detach().reshape(-1, args[0].shape[-1]))
        raise _StopForward  # the rest of the layer is not needed

    handle = block.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for h in hidden:
                try:
                    layer(to_device(h, device), **kwargs[(index, h.shape[0])])
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return captured


def run_layer_collecting(layer: nn.Module, block: nn.Module, index: int, hidden: list[torch.Tensor], kwargs: dict,
                         device: torch.device | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """`(flat MoE-block inputs per batch, layer outputs per batch)` from one forward of the layer as
    it is (original propagation: the source layer, before its block is replaced). Each input batch
    is dropped as its output is formed, so the peak is that of `collect_block_inputs`."""
    captured: list[torch.Tensor] = []

    def hook(module, args):
        captured.append(args[0].detach().reshape(-1, args[0].shape[-1]))

    handle = block.register_forward_pre_hook(hook)
    out = []
    try:
        with torch.no_grad():
            for b in range(len(hidden)):
                h = hidden[b]
                y = layer(to_device(h, device), **kwargs[(index, h.shape[0])])
                out.append(layer_output(y).to(h.device))
                hidden[b] = None  # the caller's list: its batches are replaced, not kept twice
    finally:
        handle.remove()
    return captured, out
