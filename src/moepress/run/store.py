"""Layer stores of the pipeline: where decoder layers live between their turns.

`InMemoryLayers`: the model is resident; onload/offload only move devices.

`StreamingLayers` (bounded-memory compression): the model is built on the meta device;
embeddings, final norm and head are loaded; then the pipeline onloads layer i from the source
checkpoint (either on-disk layout), compresses it, runs it, writes the finished layer to its own safetensors shard in a work directory and sends it
back to meta. Peak memory is therefore one decoder layer + the calibration hidden states +
accumulators + the embeddings/head, whatever the depth (benchmarks/memory_depth.py measures it).
Saving hands the finished shards over to the checkpoint writer (`export.save_checkpoint`).

Data parallel (`torchrun`): every rank streams the layers it propagates through, but rank 0 alone
owns the work directory: it writes the finished shards and the resume record; the other ranks
wait at a barrier while it settles the directory at `resume`, then read the same record.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import shutil
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .. import distributed
from ..arch import decoder_layers, family_of
from ..arch.checkpoint import CheckpointReader
from ..modeling.modeling_moepress import describe_block, rebuild_block

LAYER_PREFIX = "model.layers."
PROGRESS = "progress.json"


def _non_layer_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    layers = decoder_layers(model)
    out = []

    def walk(prefix, module):
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if child is layers:
                continue
            if any(c is layers for c in child.modules()):
                walk(full + ".", child)
            else:
                out.append((full, child))

    walk("", model)
    return out


class InMemoryLayers:
    """Layer store for a model that is fully resident: onload/offload only move devices."""

    def __init__(self, model: nn.Module, device: str | torch.device | None = None):
        self.model = model
        self.device = device

    def onload(self, index: int) -> nn.Module:
        layer = decoder_layers(self.model)[index]
        return layer.to(self.device) if self.device is not None else layer

    def finished(self, index: int) -> dict | None:
        """Never: a resident run keeps no record of earlier runs."""
        return None

    def offload(self, index: int, record: dict | None = None) -> None:
        if self.device is not None:
            decoder_layers(self.model)[index].to("cpu")

    def load_original(self, index: int) -> nn.Module:
        """Layer `index` with its source weights (before the layer loop: the layer itself)."""
        return self.onload(index)

    def release(self, index: int) -> None:
        """Put back a layer from `load_original` (nothing is written)."""
        self.offload(index)


def _current_block_info(info: dict) -> dict:
    """A progress file's block description in today's form: before `describe_block` (moepress 0.1)
    a stock block with m routed experts was written `{"experts": m}`; the run key has no code
    version, so such a work directory is adopted by a resumed run and must still rebuild."""
    if info and "kind" not in info and set(info) == {"experts"}:
        return {"kind": "experts", "num_experts": int(info["experts"])}
    return info


class StreamingLayers:
    """Layer store over a source checkpoint; finished layers go to `work_dir` as one shard each.

    Resumable: with `resume(run_key)`, each finished layer's shard, record and block structure are
    listed in `work_dir/progress.json`; a later run with the same key (same source, method, config
    and calibration tokens) reloads those layers from their shards instead of compressing them
    again, and only propagates the calibration states through them.
    """

    def __init__(self, model: nn.Module, reader: CheckpointReader, dtype: torch.dtype, work_dir: Path,
                 owns_work_dir: bool = False, output_dtype: torch.dtype | None = None):
        self.model, self.reader, self.dtype = model, reader, dtype
        self.output_dtype = output_dtype or dtype  # finished shards are written in this dtype
        self.cleared = False  # resume() found and removed another run's layers
        self.work_dir = Path(work_dir)
        self.owns_work_dir = owns_work_dir  # a directory we created is removed once handed over
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.shards: dict[str, str] = {}
        self.run_key: str | None = None
        self.done: dict[int, dict] = {}

    def resume(self, run_key: str) -> int:
        """Adopt the finished layers of an interrupted run with the same key; returns how many.

        A work directory left by a different run is cleared, never mixed in (by rank 0; other
        data-parallel ranks wait for it at a barrier)."""
        self.run_key = run_key
        progress = self.work_dir / PROGRESS
        state = json.loads(progress.read_text()) if progress.exists() else {}
        if state.get("run_key") != run_key and distributed.is_main_process():
            for stale in self.work_dir.glob("layer-*.safetensors"):
                stale.unlink()
                self.cleared = True
            progress.unlink(missing_ok=True)
        distributed.barrier()
        if state.get("run_key") != run_key:
            return 0
        self.done = {int(k): {**v, "block": _current_block_info(v["block"])} for k, v in state["layers"].items()}
        self.shards = state["shards"]
        return len(self.done)

    def finished(self, index: int) -> dict | None:
        """The record of layer `index` if an earlier run of this key finished it."""
        return self.done.get(index, {}).get("record")

    def _load_into(self, module: nn.Module, prefix: str) -> None:
        module.to_empty(device="cpu")
        with torch.no_grad():
            for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
                key = f"{prefix}{name}"
                try:
                    if tensor.is_floating_point() and tensor.dtype != self.dtype and self.dtype != torch.float32:
                        tensor.copy_(self.reader.tensor(key).to(self.dtype))  # rounded through self.dtype
                    else:  # in place, no full-size temporary (copy_ casts; through float32 would round alike)
                        self.reader.copy_into(key, tensor)
                except KeyError:
                    if isinstance(tensor, nn.Parameter):
                        raise
                    continue  # non-persistent buffer: rebuilt below by its owner

    def onload(self, index: int) -> nn.Module:
        layer = decoder_layers(self.model)[index]
        if index in self.done:
            self._restore_finished(layer, index)
        elif next(layer.parameters()).is_meta:
            self._load_into(layer, f"{LAYER_PREFIX}{index}.")
            self.reader.close()  # close the files this layer was read from
        return layer

    def load_original(self, index: int) -> nn.Module:
        """Layer `index` with the source checkpoint's weights, also when a resumed run finished it
        (for passes over the original model before the layer loop, e.g. D²-MoE's Fisher, while
        every layer still has the source's structure); give it back with `release`."""
        layer = decoder_layers(self.model)[index]
        self._load_into(layer, f"{LAYER_PREFIX}{index}.")
        self.reader.close()
        return layer

    def release(self, index: int) -> None:
        """Send a layer from `load_original` back to meta without writing a shard."""
        decoder_layers(self.model)[index].to("meta")
        release_freed_memory()

    def _restore_finished(self, layer: nn.Module, index: int) -> None:
        """Give layer `index` the structure it had when finished, then load its shard."""
        block_info = self.done[index]["block"]
        if block_info:
            spec = family_of(self.model)
            with torch.device("meta"):
                spec.set_block(layer, rebuild_block(spec.block_of(layer), self.model.config, block_info))
        layer.to_empty(device="cpu")
        prefix = f"{LAYER_PREFIX}{index}."
        with safe_open(self.work_dir / f"layer-{index:05d}.safetensors", "pt") as fh, torch.no_grad():
            for name, tensor in layer.state_dict(keep_vars=True).items():
                tensor.copy_(fh.get_tensor(prefix + name))

    def offload(self, index: int, record: dict | None = None) -> None:
        layer = decoder_layers(self.model)[index]
        if distributed.is_main_process():  # the work directory is rank 0's
            self._write_finished(layer, index, record)
        layer.to("meta")
        release_freed_memory()

    def _write_finished(self, layer: nn.Module, index: int, record: dict | None) -> None:
        state = {f"{LAYER_PREFIX}{index}.{k}": (v.to(self.output_dtype) if v.is_floating_point() else v).contiguous()
                 for k, v in layer.state_dict().items()}
        name = f"layer-{index:05d}.safetensors"
        save_file(state, str(self.work_dir / name), metadata={"format": "pt"})
        self.shards.update({k: name for k in state})
        del state
        if self.run_key is not None:
            self._record_progress(index, family_of(self.model).block_of(layer), record)

    def _record_progress(self, index: int, block: nn.Module, record: dict | None) -> None:
        info = describe_block(block, self.model.config, stock_always=True) or {}  # {}: a dense layer
        self.done[index] = {"record": record, "block": info}
        state = {"run_key": self.run_key, "layers": {str(k): v for k, v in self.done.items()}, "shards": self.shards}
        tmp = self.work_dir / (PROGRESS + ".tmp")
        tmp.write_text(json.dumps(state, default=str))
        tmp.replace(self.work_dir / PROGRESS)  # atomic: a kill never leaves a torn progress file


    def hand_over(self, directory: Path, convert=None) -> dict[str, str]:
        """Write the finished layer shards into checkpoint `directory`; returns `{tensor key: file}`.

        `convert` (state dict -> state dict, e.g. to the hub's names) is applied to each shard on the
        way, one layer in memory at a time; the work directory keeps in-memory names for resuming.
        The work shards stay until `finish` (called once the checkpoint is renamed into place): a
        save killed half-way leaves a work directory the same command resumes from. Without
        `convert` the shards are hard-linked (no second copy on disk); with it the save needs the
        finished layers' size once more on disk until `finish`."""
        weight_map = {}
        for fname in sorted(set(self.shards.values())):
            if convert is None:
                _link_or_copy(self.work_dir / fname, Path(directory) / fname)
                weight_map.update({k: fname for k, v in self.shards.items() if v == fname})
                continue
            state = convert(load_file(str(self.work_dir / fname)))
            save_file({k: v.contiguous() for k, v in state.items()}, str(Path(directory) / fname),
                      metadata={"format": "pt"})
            weight_map.update({k: fname for k in state})
            del state
            release_freed_memory()
        return weight_map

    def finish(self) -> None:
        """The checkpoint is in place: the run is complete. Its shards and resume record go, and so
        does a work directory this store created itself."""
        for fname in set(self.shards.values()):
            (self.work_dir / fname).unlink(missing_ok=True)
        (self.work_dir / PROGRESS).unlink(missing_ok=True)
        if self.owns_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def close(self) -> None:
        """Unmap the source checkpoint."""
        self.reader.close()


def release_freed_memory() -> None:
    """Return freed heap pages to the OS. glibc raises its mmap threshold after large frees, so
    later layer-sized tensors come from the heap and freed ones stay in RSS; trimming after each
    layer keeps the peak independent of depth (measured: benchmarks/memory_depth.py)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def open_streaming(path: str | Path, work_dir: Path, dtype: torch.dtype = torch.float32, owns_work_dir: bool = False,
                   output_dtype: torch.dtype | None = None):
    """(model with layers on meta and everything else loaded, its `StreamingLayers` store).

    `dtype`: the dtype layers are computed in; `output_dtype` (default `dtype`): the dtype finished
    layer shards are written in. `owns_work_dir`: the caller created `work_dir` for this run only;
    it is removed at `hand_over`."""
    from ..loading import check_model_files

    check_model_files(path)
    config = transformers.AutoConfig.from_pretrained(str(path))
    spec = family_of(config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    store = StreamingLayers(model, CheckpointReader(path, spec), dtype, work_dir, owns_work_dir, output_dtype)
    tied = getattr(config, "tie_word_embeddings", False)
    for name, module in _non_layer_modules(model):
        if module is model.get_output_embeddings():
            if tied:
                continue
            # compression never runs the head (D²-MoE's Fisher casts it to the states' dtype): hold it
            # in the dtype it is saved in, half the memory of a float32 copy for a bfloat16 output
            module.to(dtype=store.output_dtype)
        elif module is model.get_input_embeddings() and not tied:
            _embeddings_in_source_dtype(module, store, f"{name}.")
        store._load_into(module, f"{name}.")
        if any(True for _ in module.buffers(recurse=False)) and hasattr(module, "inv_freq"):
            _rebuild_rotary(model, name, module, config)
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    model.name_or_path = str(path)
    return model, store


def _embeddings_in_source_dtype(module: nn.Module, store: StreamingLayers, prefix: str) -> None:
    """Hold a half-precision checkpoint's input embeddings as stored and hand their lookups on in the
    compute dtype: a lookup copies rows, so the states are exactly those of a float32 copy of the
    table, at half its memory (1.2 GiB for a 151936 x 2048 vocabulary)."""
    stored = store.reader.stored_dtype(f"{prefix}weight")
    if stored not in (torch.bfloat16, torch.float16) or store.dtype != torch.float32:
        return
    module.to(dtype=stored)
    module.register_forward_hook(lambda _module, _args, out: out.to(store.dtype))


def _rebuild_rotary(model: nn.Module, name: str, module: nn.Module, config) -> None:
    """Rotary embeddings keep non-persistent buffers computed at init: rebuild on CPU."""
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.rsplit(".", 1)[-1], type(module)(config=config))


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link of `source` at `target` (same file system: no bytes copied), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
