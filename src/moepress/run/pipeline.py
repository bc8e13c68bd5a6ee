"""The layer-wise loop (docs/design.md#pipeline): onload layer -> statistics -> method -> propagate -> offload.

Calibration hidden states are captured at the input of decoder layer 0, then every layer is run
on them in turn. At an MoE layer the block's inputs (post-attention-norm hidden states) are
collected, the method compresses the block, and the *compressed* layer produces the next layer's
inputs ("sequential" propagation, as NAEE's layer-wise pruning; D²-MoE's `get_scale.py` propagates
through the original model instead — docs/algorithms.md#propagation asks us to record which: moepress.json
records `propagation`). `propagation="original"` runs the source layer instead (one forward
giving the block's inputs and the next layer's), so every statistic is that of the uncompressed
model and reusable from the statistics cache (`cache.py`, `cache_keys.py`) by any ratio or method; it is
the default of a method whose authors gather statistics that way (`Method.propagation`: HC-SMoE).

Peak memory = one decoder layer + the hidden states of the calibration tokens + one layer's MoE
inputs + the method's accumulators, independent of depth with `store.StreamingLayers`.

Devices: with `device` (e.g. a GPU) each decoder layer is moved there for its turn and back to
the CPU before the store offloads it; its MoE inputs, statistics and the method's solve live
there. Hidden states between layers live on `hidden_on` (the CPU when they would not fit; each
batch then visits the device for the layer's forward).

Data parallel (`torchrun`): each rank captures and propagates its own contiguous shard of the
calibration sequences (`distributed.shard_slice`); `LayerStatistics` sums every statistic over
ranks, so every rank takes the same decision from the same reduced statistics, and the block
of rank 0 is then broadcast into every rank's layer: all ranks propagate bit-identical weights
even where a solver (e.g. on a GPU) is not bit-reproducible. Every rank solving (rather than
rank 0 alone) needs no serialisation of method-specific blocks and keeps no rank idle.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .. import checks, distributed
from ..arch import decoder_layers, layer_view, moe_layer_indices, set_moe_block
from ..calib import CalibrationSet, LayerStatistics
from ..checks import DamagedSourceError, InputError
from ..methods import LayerContext, Method
from .cache_keys import PipelineCache
from .store import InMemoryLayers
from .walk import capture_layer_inputs, collect_block_inputs, run_layer, run_layer_collecting, to_device


def compress_layers(model: nn.Module, method: Method, calibration: CalibrationSet | None, *,
                    batch_size: int = 8, store=None, progress: Callable | None = None,
                    device: str | torch.device | None = None, hidden_on: str = "auto", stats_cache=None,
                    propagation: str | None = None, plan=None) -> dict[int, dict]:
    """Run `method` over every MoE layer of `model` (or those `plan` selects); returns `{layer index: record}`.
    The caller then calls `method.finalize(model, records)` (model-level edits; what the result is).

    A method with `needs_calibration=False` gets no statistics: no hidden states are captured or
    propagated (`calibration` may be None) and each MoE layer is only onloaded, compressed and
    offloaded.

    Args:
        store: a layer store (`store.InMemoryLayers`, the default, or `StreamingLayers`)
            with `onload(i) -> layer`, `finished(i) -> record | None` and `offload(i, record)`.
        progress: optional callback `progress(done, total, description)`.
        device: where each layer is computed (None = where it is); it goes back to the CPU after.
        hidden_on: where hidden states wait between layers: "cpu", "device" or "auto"
            (`hidden_placement`).
        stats_cache: a `run.cache.StatsCache` (None = none): statistics are read from it where
            they match and written to it otherwise.
        plan: a `plan.LayerPlan`: only its `selected` MoE layers are compressed (the others
            are left as they are and only propagate), each keeping `plan.experts[i]` experts when given.
        propagation: None = the method's own (`Method.propagation`: "compressed" but for HC-SMoE), or
            "compressed" (the next layer's inputs come from the compressed layer) or
            "original" (from the source layer, run once before the compressed block is installed;
            its statistics then do not depend on the method: with a cache and a method that reads
            only cached statistics, no hidden state is captured or propagated at all).
    """
    store = store or InMemoryLayers(model)
    device = torch.device(device) if device is not None else None
    layers = decoder_layers(model)
    moe = moe_layer_indices(model)
    needs = method.requirements()
    propagate = needs.calibration
    propagation = propagation or needs.propagation
    if propagate and calibration is None:
        raise ValueError(f"method {method.name!r} computes statistics on calibration text; give calib")
    check_finite_weights(model, "outside the decoder layers", skip=layers)
    if propagation not in checks.PROPAGATIONS:
        raise InputError(f"propagation must be one of {', '.join(checks.PROPAGATIONS)}, got {propagation!r}")
    selected = set(moe) if plan is None else set(plan.selected)
    cache_plan = PipelineCache(stats_cache, model, calibration, batch_size, device, propagation, layers) \
        if stats_cache is not None and propagate else None
    num_tokens = None
    if cache_plan is not None and not cache_plan.inputs_needed(method, sorted(selected), len(layers), store):
        propagate, num_tokens = False, int(calibration.input_ids.numel())  # every statistic is cached
    hidden, kwargs = capture_layer_inputs(model, calibration, batch_size) if propagate else ([], {})
    kwargs = to_device(kwargs, device)  # rotary tables and masks: small, used by every layer
    hidden = to_device(hidden, hidden_placement(hidden, device, hidden_on))
    method.prepare(model, calibration, store=store, stats_cache=stats_cache if calibration is not None else None)
    loop = _LayerLoop(model, method, store, device, propagate, propagation, selected,
                      {} if plan is None else plan.experts, cache_plan, num_tokens, moe, hidden, kwargs)
    del hidden  # the loop holds the states now: each layer's inputs are freed once its outputs exist
    records: dict[int, dict] = {}
    for i in range(len(layers)):
        record = loop.turn(i)
        if record is not None:
            records[i] = record
        if progress is not None:
            progress(i + 1, len(layers), f"layer {i + 1}/{len(layers)}")
    return records


@dataclass
class _LayerLoop:
    """What every layer's turn of `compress_layers` shares; `hidden` (the calibration states at the
    input of the next layer) moves on with each turn."""

    model: nn.Module
    method: Method
    store: object
    device: torch.device | None
    propagate: bool
    propagation: str
    selected: set[int]
    layer_experts: dict[int, int]
    cache_plan: PipelineCache | None
    num_tokens: int | None
    moe: list[int]
    hidden: list[torch.Tensor]
    kwargs: dict

    def turn(self, i: int) -> dict | None:
        """Layer `i`: onload -> compress (if selected and not finished by an earlier run) -> propagate
        -> offload; returns its record (None for a layer left as it is)."""
        t0 = time.perf_counter()
        finished = self.store.finished(i)
        propagated = False
        if finished is not None and self.propagate and self.propagation == "original":
            self._through_source_layer(i)  # a resumed layer: the next inputs come from the source layer
            propagated = True
        layer = self.store.onload(i)
        check_finite_weights(layer, f"layer {i}", prefix=f"model.layers.{i}.", model=self.model)
        if self.cache_plan is not None:
            self.cache_plan.onloaded(i, layer)
        layer = _onto(layer, self.device)
        record = None
        if finished is not None:  # resumed: this layer was compressed by an interrupted run
            record = {**finished, "resumed": True}
        elif i in self.selected:
            record, layer, propagated = self._compress(i, layer)
        if self.propagate and not propagated:
            self.hidden = run_layer(layer, i, self.hidden, self.kwargs, self.device)
            check_finite_hidden(self.hidden, i)
        if self.cache_plan is not None:
            self.cache_plan.propagated(i, layer, changed=i in self.selected and finished is None)
        if record is not None and finished is None:
            _synchronize(self.device)
            record["seconds"] = round(time.perf_counter() - t0, 3)
        if self.device is not None and self.device.type != "cpu":
            layer.to("cpu")
        self.store.offload(i, record)
        return record

    def _through_source_layer(self, i: int) -> None:
        source_layer = self.store.load_original(i)
        if self.cache_plan is not None:  # the source weights propagate: they, not the finished ones, key what follows
            self.cache_plan.onloaded(i, source_layer)
        self.hidden = run_layer(_onto(source_layer, self.device), i, self.hidden, self.kwargs, self.device)
        source_layer.to("cpu")
        self.store.release(i)

    def _compress(self, i: int, layer: nn.Module) -> tuple[dict, nn.Module, bool]:
        """`(record, the layer with its new block, whether the hidden states have moved on)`."""
        inputs, propagated = None, False
        if self.propagate and self.propagation == "original":  # one forward: the block's inputs and the next layer's
            inputs, self.hidden = run_layer_collecting(layer, layer_view(self.model, i).block, i, self.hidden,
                                                       self.kwargs, self.device)
            check_finite_hidden(self.hidden, i)
            propagated = True
        record = _compress_moe_layer(self.model, self.method, layer, i, self.moe, self.hidden, self.kwargs,
                                     self.device, inputs=inputs,
                                     disk=self.cache_plan.layer_cache(i) if self.cache_plan is not None else None,
                                     num_tokens=self.num_tokens, experts=self.layer_experts.get(i))
        return record, _onto(layer, self.device), propagated  # a new block may have been built elsewhere


def check_finite_weights(module: nn.Module, where: str, prefix: str = "", skip: nn.Module | None = None,
                         model: nn.Module | None = None) -> None:
    """Refuse NaN/Inf weights as they are onloaded, naming the tensor as the checkpoint file stores it
    (and the expert): a damaged checkpoint would otherwise pass silently (a pruned NaN expert) or
    fail inside a solver with an unrelated message. `model`: the whole model (for the file's names)."""
    skipped = {id(p) for p in skip.parameters()} if skip is not None else set()
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if id(tensor) in skipped or tensor.is_meta or not tensor.is_floating_point():
            continue
        flat = tensor.detach().reshape(-1)  # in chunks: isfinite makes full-size temporaries
        if not all(bool(torch.isfinite(c).all()) for c in flat.split(1 << 22)):
            nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
            raise DamagedSourceError(f"{where}: weight {_stored_name(model or module, prefix + name, tensor)} "
                                     f"holds {nan} NaN and {inf} Inf values; the source checkpoint is damaged: "
                                     f"repair it or download it again (nothing was written to the output)")


def _stored_name(model: nn.Module, name: str, tensor: torch.Tensor) -> str:
    """How the non-finite values of in-memory tensor `name` are named in the source's files: the
    family's hub layout (per-expert names, as `save_pretrained` writes) or the fused name the file
    holds, with the expert(s) and the file, e.g. `model.layers.0.block_sparse_moe.experts.3.w1.weight
    (expert 3) in model.safetensors`."""
    from ..checks import safetensors_keys
    from ..modeling.moepress_layout import to_hub_layout

    bad = ~torch.isfinite(tensor.detach())
    experts = []
    if ".experts." in f".{name}" and tensor.dim() >= 2:  # fused routed experts: dim 0 is the expert
        experts = bad.reshape(bad.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
    try:
        hub = to_hub_layout(model, {name: bad.to(torch.float32)}) if hasattr(model, "config") else {}
    except Exception:  # noqa: BLE001 - naming must never hide the error it names
        hub = {}
    names = [k for k, v in hub.items() if bool(v.any())] or [name]
    files = safetensors_keys(getattr(model, "name_or_path", "") or "")
    if files and not any(k in files for k in names) and name in files:
        names = [name]  # a checkpoint saved fused (save_original_format=False)
    text = names[0] + (f" (and {len(names) - 1} more tensors)" if len(names) > 1 else "")
    if experts:
        text += f" ({'expert' if len(experts) == 1 else 'experts'} {', '.join(map(str, experts))})"
    if names[0] in files:
        text += f" in {files[names[0]]}"
    return text


def check_finite_hidden(hidden: list[torch.Tensor], index: int) -> None:
    """Refuse calibration hidden states that stopped being finite after layer `index` (its weights were)."""
    if not all(bool(torch.isfinite(h).all()) for h in hidden):
        raise InputError(f"layer {index}: the calibration hidden states leaving this layer hold NaN/Inf "
                         f"although its weights are finite (the activations overflow); nothing was written")


def _compress_moe_layer(model: nn.Module, method: Method, layer: nn.Module, index: int, moe: list[int],
                        hidden: list[torch.Tensor], kwargs: dict, device: torch.device | None = None,
                        inputs: list[torch.Tensor] | None = None, disk=None, num_tokens: int | None = None,
                        experts: int | None = None) -> dict:
    """Statistics the method declared (each computed once, or read from the statistics cache
    `disk`), its decision, the block installed (rank 0's, broadcast, in a data-parallel run).

    `inputs`: the block's inputs when already collected (original propagation); `num_tokens`: the
    token count when no input was propagated (every statistic comes from `disk`).
    The layer's MoE inputs and statistics are freed on return, before the layer propagates."""
    view = layer_view(model, index)
    if inputs is None:
        inputs = collect_block_inputs(layer, view.block, index, hidden, kwargs, device) if hidden else []
    stats = LayerStatistics(view, inputs, disk=disk, num_tokens=num_tokens)
    for name in method.requirements().statistics:
        stats[name]
    result = method.compress_layer(LayerContext(view, stats, moe.index(index), len(moe), model, experts))
    if result.block is not None:
        distributed.broadcast_module_(_onto(result.block, device))
        set_moe_block(model, index, result.block)
    return {**result.record, "tokens": stats.num_tokens}


def hidden_placement(hidden: list[torch.Tensor], device: torch.device | None, hidden_on: str = "auto"):
    """Device for the hidden states between layers: `device` or the CPU.

    "auto": on a GPU when they take at most a quarter of its free memory (the rest is for the
    layer, its MoE inputs and the accumulators), else on the CPU."""
    if hidden_on not in ("auto", "cpu", "device"):
        raise ValueError(f"hidden_on must be 'auto', 'cpu' or 'device', got {hidden_on!r}")
    if device is None or device.type == "cpu" or hidden_on == "cpu":
        return torch.device("cpu") if hidden_on == "cpu" else device
    if hidden_on == "device":
        return device
    size = sum(h.numel() * h.element_size() for h in hidden)
    free, _ = torch.cuda.mem_get_info(device) if device.type == "cuda" else (0, 0)
    return device if size <= free // 4 else torch.device("cpu")


def _onto(module: nn.Module, device: torch.device | None) -> nn.Module:
    return module.to(device) if device is not None else module


def _synchronize(device: torch.device | None) -> None:
    """Wait for queued GPU work so a layer's recorded seconds are its real time."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
