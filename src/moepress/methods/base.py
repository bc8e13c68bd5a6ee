"""The method interface and the registry (DESIGN.md §2 "methods: one package each").

A method is a class with a typed config dataclass. The pipeline calls, in order:
`prepare(model, calibration, store)` once (model-level statistics such as Fisher), then for every MoE
layer `compress_layer(ctx)` with the layer's calibration inputs, then `finalize(model)` once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from ..arch import MoELayerView
from ..calib.stats import LayerStatistics


class ConfigError(ValueError):
    """A method option out of range or inconsistent; the message says what is allowed."""


@dataclass
class MethodConfig:
    """Fields every method shares. Subclasses add their own fields, each with `metadata={"help": ...}`.

    ratio: fraction of routed-expert parameters removed in the compressed layers (DESIGN.md §1);
        for `compressed_experts` the fraction of each token's activated experts replaced.
    experts: number of routed experts to keep per layer (merging/pruning; replaces `ratio`).
    """

    ratio: float | None = field(default=None, metadata={"help": "fraction of routed-expert parameters removed (0-1)"})
    experts: int | None = field(default=None, metadata={"help": "routed experts kept per layer (replaces --ratio)"})

    def __post_init__(self):
        if self.ratio is not None and not 0.0 <= float(self.ratio) < 1.0:
            raise ConfigError(f"--ratio must be in [0, 1), got {self.ratio}")
        if self.experts is not None and int(self.experts) < 1:
            raise ConfigError(f"--experts must be >= 1, got {self.experts}")

    def kept_experts(self, num_experts: int, top_k: int = 1) -> int:
        """Experts kept per layer for merging/pruning: `experts`, else round(N * (1 - ratio))."""
        if self.experts is not None:
            m = int(self.experts)
        elif self.ratio is not None:
            m = int(round(num_experts * (1.0 - float(self.ratio))))
        else:
            raise ConfigError("give --ratio or --experts")
        if not max(1, top_k) <= m <= num_experts:
            raise ConfigError(
                f"keeping {m} of {num_experts} experts is out of range: keep between top-k={top_k} and {num_experts}"
            )
        return m

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class LayerContext:
    """What a method sees for one MoE layer.

    view: the layer's uniform view (arch).
    stats: lazily computed, cached statistics over `stats.batches` (flat MoE inputs `[t, H]`).
    position: index of this layer among the MoE layers; num_layers: how many MoE layers.
    model: the whole model (read-only; for methods with model-level state from `prepare`).
    """

    view: MoELayerView
    stats: LayerStatistics
    position: int
    num_layers: int
    model: nn.Module | None = None


@dataclass
class LayerResult:
    """A method's decision for one layer: the block to install (None = keep) and a JSON record."""

    block: nn.Module | None
    record: dict = field(default_factory=dict)


class Method:
    """Base class. Subclasses set `name`, `summary`, `config_class`, and implement `compress_layer`.

    export: "stock" when the result is the family's own class (pruning), "custom" when the
    checkpoint needs moepress modeling code via auto_map.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    export: ClassVar[str] = "stock"
    needs: ClassVar[tuple[str, ...]] = ()  # statistics the pipeline computes (once) before compress_layer
    requires_resident_model: ClassVar[bool] = False  # True if `prepare` needs every layer at once

    def __init__(self, config: MethodConfig):
        self.config = config

    def prepare(self, model: nn.Module, calibration, store=None) -> None:
        """Model-level statistics before the layer loop (default: nothing).

        store: the pipeline's layer store; `store.load_original(i)` / `store.release(i)` onload and
        drop decoder layer i of the original model (whose layers may be on meta), so a pass over
        the whole model can run one layer at a time."""

    def compress_layer(self, ctx: LayerContext) -> LayerResult:
        raise NotImplementedError

    def finalize(self, model: nn.Module, records: dict[int, dict]) -> None:
        """Model-level edits after the loop (config keys, custom-block metadata)."""


_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Add a method class to the registry under `cls.name` (one line at the end of each package)."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> dict[str, type[Method]]:
    from . import _load_all  # noqa: F401  (imports every method package once)

    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> type[Method]:
    methods = available_methods()
    if name not in methods:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(methods)}")
    return methods[name]


def build_method(name: str, **options) -> Method:
    """Instantiate method `name` with config `options` (unknown options are an error, not ignored)."""
    cls = get_method(name)
    known = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"method {name!r} has no option(s) {unknown}; options: {sorted(known)}")
    return cls(cls.config_class(**options))
