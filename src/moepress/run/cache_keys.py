"""Keys of the statistics cache (`cache.py` is its storage): what a cached value depends on.

`LayerKeys` gives each MoE layer's statistics their exact identity (the module docstring of
`cache.py`: statistic, code version, the running hash of the layer's inputs, its weights);
`LayerCache` and `PipelineCache` are the views the pipeline hands to a layer's statistics;
`cached_per_layer` caches a model-level statistic (D²-MoE's Fisher) per layer.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from .. import distributed
from ..calib import stats as stats_module
from ..calib.stats import MISSING, cacheable
from .cache import CACHE_FORMAT, StatsCache
from .walk import source_layers


def _hasher():
    return hashlib.sha256()  # measured here: sha256 ~680 MB/s, blake2b ~470 MB/s on one core


def _update(h, name: str, tensor: torch.Tensor) -> None:
    """Feed one named tensor (name, dtype, shape, bytes) into hash `h`."""
    t = tensor.detach()
    if t.is_meta:
        raise ValueError(f"cannot hash {name}: it is on the meta device")
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def module_digest(module: nn.Module) -> str:
    """Hash of every parameter and buffer of `module` (names, dtypes, shapes, bytes).

    One pass over the bytes (sha256, ~0.7 GB/s on one core here): far below a layer's forward
    over the calibration tokens."""
    h = _hasher()
    for name, tensor in sorted(module.state_dict().items()):
        _update(h, name, tensor)
    return h.hexdigest()


def tensor_digest(tensor: torch.Tensor) -> str:
    """Hash of one tensor's dtype, shape and bytes."""
    h = _hasher()
    _update(h, "", tensor)
    return h.hexdigest()


def _update_outside_layers(h, model: nn.Module, layers: nn.Module) -> None:
    """Feed the config (less names and dtype labels) and every tensor outside `layers` into `h`."""
    config = {k: v for k, v in model.config.to_dict().items()
              if k not in ("_name_or_path", "name_or_path", "dtype", "torch_dtype", "transformers_version")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    skipped = {id(t) for t in layers.state_dict(keep_vars=True).values()}
    for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
        if id(tensor) not in skipped and not tensor.is_meta:
            _update(h, name, tensor)


def combine(*parts) -> str:
    h = _hasher()
    for part in parts:
        h.update(str(part).encode())
        h.update(b"\x00")
    return h.hexdigest()


@functools.cache
def _file_digest(path: str) -> str:
    """Hash of the code of a Python file: its syntax tree without docstrings, so an edit of a comment,
    a docstring or the layout keeps the cached values, and any edit of what runs drops them."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree, include_attributes=False).encode()).hexdigest()


@functools.cache
def code_version(*files: str) -> str:
    """Hash of `files` plus the `arch` and `ops` packages, `calib/stats.py`, the layer walk that feeds
    every statistic its inputs (`run/walk.py`), the moepress and torch versions: an edit of the code
    anywhere there (not of its comments or docstrings: `_file_digest`) invalidates the values."""
    from .. import __version__

    here = Path(__file__).parent.parent  # the moepress package
    every = {str(Path(f)) for f in files} | {str(here / "calib" / "stats.py"), str(here / "run" / "walk.py")}
    every |= {str(p) for p in (here / "arch").glob("*.py")} | {str(p) for p in (here / "ops").glob("*.py")}
    return combine(CACHE_FORMAT, __version__, torch.__version__,
                   *(f"{Path(f).name}:{_file_digest(f)}" for f in sorted(every)))


def statistic_version(name: str) -> str:
    """Code version of statistic `name` (`code_version` of the module that defines it)."""
    import inspect

    return code_version(inspect.getsourcefile(stats_module._STATISTICS[name]))


def context_digest(model: nn.Module, calibration, batch_size: int, device: torch.device | None,
                   skip: nn.Module) -> str:
    """Identity of layer 0's inputs: calibration tokens, batching (batch size, world size, device
    type), config, weights outside `skip` (the decoder layers)."""
    h = _hasher()
    h.update(f"{CACHE_FORMAT}|{batch_size}|{distributed.world_size()}|{(device or torch.device('cpu')).type}|".encode())
    _update(h, "input_ids", calibration.input_ids)
    _update_outside_layers(h, model, skip)
    return h.hexdigest()


class LayerKeys:
    """The running identity of the calibration hidden states as they pass the decoder layers.

    `inputs` is the identity of the current layer's inputs; `advance(digest)` moves past a layer
    that propagated with weights of hash `digest`."""

    def __init__(self, context: str):
        self.inputs = context

    def advance(self, propagated_digest: str) -> None:
        self.inputs = combine("layer", self.inputs, propagated_digest)


class LayerCache:
    """The cache as one `LayerStatistics` sees it (`load(name)` / `save(name, value)`).

    Rank 0 decides whether an entry is there and tells the other ranks, so every rank takes the
    same branch (a miss computes with collectives); on a hit every rank reads the file."""

    def __init__(self, cache: StatsCache, inputs: str, layer_digest: str, device: torch.device | None = None):
        self.cache, self.inputs, self.layer_digest, self.device = cache, inputs, layer_digest, device

    def key(self, name: str) -> str:
        return combine("statistic", name, statistic_version(name), self.inputs, self.layer_digest)

    def present(self, name: str) -> bool:
        here = self.cache.contains(self.key(name)) if distributed.is_main_process() else None
        return bool(distributed.broadcast_object(here))

    def load(self, name: str):
        if not self.present(name):
            self.cache.misses += 1
            return MISSING
        value = self.cache.get(self.key(name), self.device)
        if value is MISSING and distributed.is_distributed():  # evicted meanwhile by another process: the
            # other ranks may have read it, so computing here alone would desynchronise the collectives
            raise RuntimeError(f"statistics cache entry {name!r} vanished while being read; rerun")
        return value  # in one process a vanished entry is simply computed

    def save(self, name: str, value) -> None:
        if distributed.is_main_process():
            self.cache.put(self.key(name), value)


class PipelineCache:
    """What the layer loop (`pipeline.compress_layers`) asks of the cache, in one place.

    Args:
        cache: the `StatsCache`.
        propagation: "compressed" (the next layer's inputs come from the compressed layer) or
            "original" (from the source layer: every layer's statistics are then independent of the
            method and ratio, and reusable by any run on the same model and calibration).
    """

    def __init__(self, cache: StatsCache, model: nn.Module, calibration, batch_size: int,
                 device: torch.device | None, propagation: str, layers: nn.Module):
        self.cache, self.propagation, self.device = cache, propagation, device
        self.keys = LayerKeys(context_digest(model, calibration, batch_size, device, layers))
        self.digests: dict[int, str] = {}  # layer index -> hash of the weights it was onloaded with
        self.inputs: dict[int, str] = {}  # layer index -> identity of its inputs
        self.cache.inputs_propagated = True

    def inputs_needed(self, method, moe: list[int], num_layers: int, store) -> bool:
        """False when nothing needs the calibration hidden states at all: original propagation, a
        method that reads only its declared statistics (`reads_inputs=False`), and every one of them
        cached for every MoE layer. Hashes every layer's source weights once to know (through
        `store.load_original`). Rank 0 decides, every rank follows."""
        needs = method.requirements()
        names = list(needs.statistics)
        if self.propagation != "original" or needs.reads_inputs:
            return True
        if not all(cacheable(n) for n in names):
            return True
        keys = LayerKeys(self.keys.inputs)
        for i, layer in source_layers(store, range(num_layers)):
            digest = module_digest(layer)
            self.digests[i] = digest
            self.inputs[i] = keys.inputs
            keys.advance(digest)
        present = all(self.cache.contains(LayerCache(self.cache, self.inputs[i], self.digests[i]).key(n))
                      for i in moe for n in names) if distributed.is_main_process() else None
        needed = not bool(distributed.broadcast_object(present))
        self.cache.inputs_propagated = needed
        return needed

    def onloaded(self, index: int, layer: nn.Module) -> None:
        """Layer `index` is onloaded (on the CPU, before any compression): note its identity."""
        if index not in self.digests:
            self.digests[index] = module_digest(layer)
        self.inputs.setdefault(index, self.keys.inputs)

    def layer_cache(self, index: int) -> LayerCache:
        return LayerCache(self.cache, self.inputs[index], self.digests[index], self.device)

    def propagated(self, index: int, layer: nn.Module, changed: bool) -> None:
        """The hidden states moved past layer `index`: through its source weights under original
        propagation, else through `layer` as it is now (`changed`: it was compressed: hash again)."""
        if self.propagation == "original" or not changed:
            self.keys.advance(self.digests[index])
        else:
            self.keys.advance(module_digest(layer))


# ---------------------------------------------------------------------------------------------- model level


def weights_digest(model: nn.Module, store=None) -> str:
    """Hash of the whole ORIGINAL model: config, weights outside the decoder layers and every decoder
    layer's source weights (read through `store.load_original`, one layer at a time)."""
    from ..arch import decoder_layers
    from .store import InMemoryLayers

    store = store if store is not None else InMemoryLayers(model)
    layers = decoder_layers(model)
    h = _hasher()
    _update_outside_layers(h, model, layers)
    for _, layer in source_layers(store, range(len(layers))):
        h.update(module_digest(layer).encode())
    return h.hexdigest()


class CachedLayers(Mapping):
    """`{layer index: value}` read from the cache one layer at a time (the last one read is kept)."""

    def __init__(self, cache: StatsCache, keys: dict[int, str]):
        self._cache, self._keys = cache, keys
        self._last: tuple[int, object] | None = None

    def __getitem__(self, index: int):
        if self._last is None or self._last[0] != index:
            value = self._cache.get(self._keys[index])
            if value is MISSING:
                raise RuntimeError(f"statistics cache entry of layer {index} vanished while being read; rerun")
            self._last = (index, value)
        return self._last[1]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def cached_per_layer(cache: StatsCache | None, name: str, parts: tuple, layers: list[int],
                     compute: Callable[[], Mapping], code_file: str) -> Mapping:
    """A model-level statistic stored one entry per layer (e.g. D²-MoE's Fisher bases).

    `parts` identify its inputs (weights digest, token ids, options); `code_file` is the module
    that computes it (`code_version`). Every entry present: a `CachedLayers` over them (rank 0
    decides, every rank reads); else `compute()`, whose layers rank 0 stores. No cache: `compute()`."""
    if cache is None:
        return compute()
    keys = {i: combine("model-statistic", name, code_version(code_file), *parts, i) for i in layers}
    present = all(cache.contains(k) for k in keys.values()) if distributed.is_main_process() else None
    if distributed.broadcast_object(present):
        return CachedLayers(cache, keys)
    cache.misses += len(keys)
    value = compute()
    if distributed.is_main_process():
        for i, key in keys.items():
            cache.put(key, dict(value[i]))
    return value
