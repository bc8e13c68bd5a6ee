"""Bounded-memory compression: decoder layers live on disk and are onloaded one at a time.

The model is built on the meta device; embeddings, final norm and head are loaded; then the
pipeline onloads layer i from the source checkpoint (either on-disk layout), compresses it, runs
it, writes the finished layer to its own safetensors shard in a work directory and sends it
back to meta. Peak memory is therefore one decoder layer + the calibration hidden states +
accumulators + the embeddings/head, whatever the depth (benchmarks/memory_depth.py measures it).
"""

from __future__ import annotations

import copy
import ctypes
import gc
import json
import shutil
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .arch import decoder_layers, family_of, set_expert_count
from .arch.checkpoint import CheckpointReader

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


class StreamingLayers:
    """Layer store over a source checkpoint; finished layers go to `work_dir` as one shard each.

    Resumable: with `resume(run_key)`, each finished layer's shard, record and block structure are
    listed in `work_dir/progress.json`; a later run with the same key (same source, method, config
    and calibration tokens) reloads those layers from their shards instead of compressing them
    again, and only propagates the calibration states through them.
    """

    def __init__(self, model: nn.Module, reader: CheckpointReader, dtype: torch.dtype, work_dir: Path):
        self.model, self.reader, self.dtype = model, reader, dtype
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.shards: dict[str, str] = {}
        self.run_key: str | None = None
        self.done: dict[int, dict] = {}

    def resume(self, run_key: str) -> int:
        """Adopt the finished layers of an interrupted run with the same key; returns how many.

        A work directory left by a different run is cleared, never mixed in."""
        self.run_key = run_key
        progress = self.work_dir / PROGRESS
        state = json.loads(progress.read_text()) if progress.exists() else {}
        if state.get("run_key") != run_key:
            for stale in self.work_dir.glob("layer-*.safetensors"):
                stale.unlink()
            progress.unlink(missing_ok=True)
            return 0
        self.done = {int(k): v for k, v in state["layers"].items()}
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
                    value = self.reader.tensor(key)
                except KeyError:
                    if isinstance(tensor, nn.Parameter):
                        raise
                    continue  # non-persistent buffer: rebuilt below by its owner
                tensor.copy_(value.to(tensor.dtype if not tensor.is_floating_point() else self.dtype))

    def onload(self, index: int) -> nn.Module:
        layer = decoder_layers(self.model)[index]
        if index in self.done:
            self._restore_finished(layer, index)
        elif next(layer.parameters()).is_meta:
            self._load_into(layer, f"{LAYER_PREFIX}{index}.")
            self.reader.close()  # unmap what this layer touched
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
        if "kind" in block_info:
            from .modeling.modeling_moepress import BLOCK_KINDS

            layer.mlp = BLOCK_KINDS[block_info["kind"]].from_layer_config(layer.mlp, self.model.config, block_info)
        elif "experts" in block_info:
            cfg = copy.deepcopy(self.model.config)
            set_expert_count(cfg, family_of(cfg), block_info["experts"])
            with torch.device("meta"):
                layer.mlp = type(layer.mlp)(cfg)
        layer.to_empty(device="cpu")
        prefix = f"{LAYER_PREFIX}{index}."
        with safe_open(self.work_dir / f"layer-{index:05d}.safetensors", "pt") as fh, torch.no_grad():
            for name, tensor in layer.state_dict(keep_vars=True).items():
                tensor.copy_(fh.get_tensor(prefix + name))

    def offload(self, index: int, record: dict | None = None) -> None:
        layer = decoder_layers(self.model)[index]
        state = {f"{LAYER_PREFIX}{index}.{k}": v.contiguous() for k, v in layer.state_dict().items()}
        name = f"layer-{index:05d}.safetensors"
        save_file(state, str(self.work_dir / name), metadata={"format": "pt"})
        self.shards.update({k: name for k in state})
        del state
        if self.run_key is not None:
            self._record_progress(index, layer.mlp, record)
        layer.to("meta")
        release_freed_memory()

    def _record_progress(self, index: int, block: nn.Module, record: dict | None) -> None:
        if getattr(block, "is_moepress_block", False):
            info = block.layer_config()
        elif hasattr(getattr(block, "experts", None), "gate_up_proj"):
            info = {"experts": int(block.experts.gate_up_proj.shape[0])}
        else:
            info = {}
        self.done[index] = {"record": record, "block": info}
        state = {"run_key": self.run_key, "layers": {str(k): v for k, v in self.done.items()}, "shards": self.shards}
        tmp = self.work_dir / (PROGRESS + ".tmp")
        tmp.write_text(json.dumps(state, default=str))
        tmp.replace(self.work_dir / PROGRESS)  # atomic: a kill never leaves a torn progress file


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
    (store.work_dir / PROGRESS).unlink(missing_ok=True)  # the run is complete: nothing left to resume
    weight_map.update(store.shards)
    index = {"metadata": {"total_size": 0}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    model.config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
