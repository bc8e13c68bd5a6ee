"""Bounded-memory compression: decoder layers live on disk and are onloaded one at a time.

The model is built on the meta device; embeddings, final norm and head are loaded; then the
pipeline onloads layer i from the source checkpoint (either on-disk layout), compresses it, runs
it, writes the finished layer to its own safetensors shard in a work directory and sends it
back to meta. Peak memory is therefore one decoder layer + the calibration hidden states +
accumulators + the embeddings/head, whatever the depth (benchmarks/memory_depth.py measures it).
"""

from __future__ import annotations

import ctypes
import gc
import json
import shutil
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from torch import nn

from .arch import decoder_layers, family_of
from .arch.checkpoint import CheckpointReader

LAYER_PREFIX = "model.layers."


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


class StreamingLayers:
    """Layer store over a source checkpoint; finished layers go to `work_dir` as one shard each."""

    def __init__(self, model: nn.Module, reader: CheckpointReader, dtype: torch.dtype, work_dir: Path):
        self.model, self.reader, self.dtype = model, reader, dtype
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.shards: dict[str, str] = {}

    def _load_into(self, module: nn.Module, prefix: str) -> None:
        module.to_empty(device="cpu")
        with torch.no_grad():
            for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
                key = f"{prefix}{name}"
                try:
                    value = self.reader.tensor(key)
                except KeyError:
                    if isinstance(tensor, nn.Parameter):
                        raise
                    continue  # non-persistent buffer: rebuilt below by its owner
                tensor.copy_(value.to(tensor.dtype if not tensor.is_floating_point() else self.dtype))

    def onload(self, index: int) -> nn.Module:
        layer = decoder_layers(self.model)[index]
        if next(layer.parameters()).is_meta:
            self._load_into(layer, f"{LAYER_PREFIX}{index}.")
            self.reader.close()  # unmap what this layer touched
        return layer

    def offload(self, index: int) -> None:
        layer = decoder_layers(self.model)[index]
        state = {f"{LAYER_PREFIX}{index}.{k}": v.contiguous() for k, v in layer.state_dict().items()}
        name = f"layer-{index:05d}.safetensors"
        save_file(state, str(self.work_dir / name), metadata={"format": "pt"})
        self.shards.update({k: name for k in state})
        del state
        layer.to("meta")
        release_freed_memory()


def release_freed_memory() -> None:
    """Return freed heap pages to the OS. glibc raises its mmap threshold after large frees, so
    later layer-sized tensors come from the heap and freed ones stay in RSS; trimming after each
    layer keeps the peak independent of depth (measured: benchmarks/memory_depth.py)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def open_streaming(path: str | Path, work_dir: Path, dtype: torch.dtype = torch.float32):
    """(model with layers on meta and everything else loaded, its `StreamingLayers` store)."""
    config = transformers.AutoConfig.from_pretrained(str(path))
    spec = family_of(config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    store = StreamingLayers(model, CheckpointReader(path, spec), dtype, work_dir)
    tied = getattr(config, "tie_word_embeddings", False)
    for name, module in _non_layer_modules(model):
        if tied and module is model.get_output_embeddings():
            continue
        store._load_into(module, f"{name}.")
        if any(True for _ in module.buffers(recurse=False)) and hasattr(module, "inv_freq"):
            _rebuild_rotary(model, name, module, config)
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    model.name_or_path = str(path)
    return model, store


def _rebuild_rotary(model: nn.Module, name: str, module: nn.Module, config) -> None:
    """Rotary embeddings keep non-persistent buffers computed at init: rebuild on CPU."""
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.rsplit(".", 1)[-1], type(module)(config=config))


def write_streamed_checkpoint(model: nn.Module, store: StreamingLayers, tmp: Path) -> None:
    """Move the finished layer shards into `tmp`, add the rest, and write the index + config."""
    rest = {}
    seen = set()
    for name, tensor in model.state_dict().items():
        if name.startswith(LAYER_PREFIX) or tensor.is_meta:
            continue
        if tensor.data_ptr() in seen:  # tied weights are stored once (transformers re-ties on load)
            continue
        seen.add(tensor.data_ptr())
        rest[name] = tensor.contiguous()
    save_file(rest, str(tmp / "model-rest.safetensors"), metadata={"format": "pt"})
    weight_map = {k: "model-rest.safetensors" for k in rest}
    for fname in sorted(set(store.shards.values())):
        shutil.move(str(store.work_dir / fname), tmp / fname)
    weight_map.update(store.shards)
    index = {"metadata": {"total_size": 0}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    model.config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
