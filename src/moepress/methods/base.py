"""The method interface and the registry (docs/design.md#methods).

A method is a class with a typed config dataclass and declared `Requirements` (what the run must
give it: statistics, calibration text, propagation, resident model; what it produces: the export
kind). The pipeline calls, in order: `prepare(model, calibration, store, stats_cache)` once
(model-level statistics such as Fisher), then for every MoE layer `compress_layer(ctx)` with the
layer's calibration inputs, then `finalize(model, records)` once, which returns `Finalized`.

The registry is peft-like: each package under `methods/` ends with one `register_method(...)`
line, and `available_methods()` imports every package found there, so adding a method touches
no list anywhere else.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from ..arch import MoELayerView
from ..calib.stats import LayerStatistics
from ..checks import ConfigError, InputError, check_ratio


@dataclass
class MethodConfig:
    """Fields every method shares. Subclasses add their own fields, each with `metadata={"help": ...}`.

    ratio: fraction of routed-expert parameters removed in the compressed layers (docs/design.md#ratio);
        for `compressed_experts` the fraction of each token's activated experts replaced.
    experts: number of routed experts to keep per layer (merging/pruning; replaces `ratio`).
    """

    ratio: float | None = field(default=None, metadata={"help": "fraction of routed-expert parameters removed, in (0, 1)"})
    experts: int | None = field(default=None, metadata={"help": "routed experts kept per layer (replaces --ratio)"})

    def __post_init__(self):
        try:
            check_ratio(self.ratio, self.experts)
        except InputError as exc:
            raise ConfigError(str(exc)) from None

    def kept_experts(self, num_experts: int, top_k: int = 1, layer_experts: int | None = None) -> int:
        """Experts kept per layer for merging/pruning: `layer_experts` (this layer's count from a
        per-layer budget, `LayerContext.experts`), else `experts`, else round(N * (1 - ratio))."""
        if layer_experts is not None:
            m = int(layer_experts)
        elif self.experts is not None:
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
    experts: this layer's own count of experts to keep from a per-layer budget (`run/plan.py`,
        `--budget auto`), read through `MethodConfig.kept_experts`; None = the method's config.
    """

    view: MoELayerView
    stats: LayerStatistics
    position: int
    num_layers: int
    model: nn.Module | None = None
    experts: int | None = None


@dataclass
class LayerResult:
    """A method's decision for one layer: the block to install (None = keep) and a JSON record."""

    block: nn.Module | None
    record: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Requirements:
    """What a method needs from a run and what it produces, declared once from its config
    (`Method.requirements()`); the run reads it, nothing writes it.

    statistics: per-layer statistics the pipeline computes (once) before `compress_layer`
        (`calib/stats.py` names).
    calibration: False for a method that reads no statistics: then no calibration text, no tokenizer
        and no propagation of hidden states are needed (the pipeline only visits the MoE layers).
    reads_inputs: False for a method whose `compress_layer` reads nothing from `ctx.stats` but
        `statistics` (no `stats.batches`, `stats.routed()`, other statistic): with `--propagate
        original` and all of them in the statistics cache no hidden state is propagated at all.
    propagation: which layers the calibration states pass through on their way to the next MoE
        layer: "compressed" (NAEE-style sequential) or "original" (the source model's layers, as
        methods that gather every layer's statistics in one forward pass of the unmodified model,
        e.g. HC-SMoE's released code). `--propagate` overrides it.
    export: "stock" when the result is the family's own class (pruning), "custom" when the
        checkpoint needs moepress modeling code via auto_map. What `finalize` returns may say
        "custom" where this says "stock" (per-layer expert counts no stock config expresses).
    resident_model: `prepare` needs every layer at once (no `--offload`).
    expert_count: the method keeps M experts per layer (pruning, merging) and honours a per-layer
        count (`LayerContext.experts`), so `--budget auto` applies (run/plan.py).
    layer_subset: False for a method that spreads its budget over all MoE layers itself (no `--layers`).
    next_step: what the user should do with the output before using it ({path} = the output).
    """

    statistics: tuple[str, ...] = ()
    calibration: bool = True
    reads_inputs: bool = True
    propagation: str = "compressed"
    export: str = "stock"
    resident_model: bool = False
    expert_count: bool = False
    layer_subset: bool = True
    next_step: str | None = None

    def __post_init__(self):
        if self.statistics and not self.calibration:
            raise ValueError(f"statistics {self.statistics} are computed on calibration tokens: "
                             f"calibration=False cannot declare them")
        if self.export not in ("stock", "custom"):
            raise ValueError(f"export must be 'stock' or 'custom', got {self.export!r}")

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Finalized:
    """What `Method.finalize` produced: the checkpoint kind the compressed model needs."""

    export: str


class Method:
    """Base class. Subclasses set `name`, `summary`, `config_class`, implement `compress_layer`, and
    declare what they need as class attributes (the defaults of `Requirements`, read by
    `requirements()`), or override `requirements()` where the config decides. Instances are never
    written to by the run: `requirements()` and `finalize`'s return value are how a method speaks.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    # Class-level declarations of the `Requirements` fields (see there); a config-dependent one is
    # overridden in `requirements()`, never assigned on an instance.
    export: ClassVar[str] = "stock"
    needs: ClassVar[tuple[str, ...]] = ()
    needs_calibration: ClassVar[bool] = True
    requires_resident_model: ClassVar[bool] = False
    propagation: ClassVar[str] = "compressed"
    reads_inputs: ClassVar[bool] = True
    next_step: ClassVar[str | None] = None
    keeps_expert_count: ClassVar[bool] = False
    supports_layer_subset: ClassVar[bool] = True
    # What `--ratio` removes for this method, in the user's words (`moepress methods NAME`).
    ratio_help: ClassVar[str] = "fraction of routed-expert parameters removed, in (0, 1)"

    def __init__(self, config: MethodConfig):
        self.config = config

    def requirements(self) -> Requirements:
        """This method's needs and products for its config (default: the class declarations)."""
        cls = type(self)
        return Requirements(statistics=tuple(cls.needs), calibration=cls.needs_calibration,
                            reads_inputs=cls.reads_inputs, propagation=cls.propagation, export=cls.export,
                            resident_model=cls.requires_resident_model, expert_count=cls.keeps_expert_count,
                            layer_subset=cls.supports_layer_subset, next_step=cls.next_step)

    def prepare(self, model: nn.Module, calibration, store=None, stats_cache=None) -> None:
        """Model-level statistics before the layer loop (default: nothing).

        store: the pipeline's layer store; `store.load_original(i)` / `store.release(i)` onload and
        drop decoder layer i of the original model (whose layers may be on meta), so a pass over
        the whole model can run one layer at a time.
        stats_cache: the run's `run.cache.StatsCache` (None = none), for model-level statistics a
        method reuses across runs (D²-MoE's Fisher)."""

    def compress_layer(self, ctx: LayerContext) -> LayerResult:
        raise NotImplementedError

    def finalize(self, model: nn.Module, records: dict[int, dict]) -> Finalized:
        """Model-level edits after the loop (config keys, custom-block metadata); returns what the
        compressed model is (default: the declared export)."""
        return Finalized(export=self.requirements().export)


_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Add a method class to the registry under `cls.name` (one line at the end of each package)."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} registered twice")
    if cls.needs and not cls.needs_calibration:  # Requirements refuses it too, but only once built
        raise ValueError(f"method {cls.name!r} declares statistics {cls.needs} but needs_calibration=False; "
                         f"statistics are computed on calibration tokens")
    _REGISTRY[cls.name] = cls
    return cls


@functools.cache
def _import_method_packages() -> None:
    """Import every package under `methods/` once; each registers its method on import."""
    package = importlib.import_module(__package__)
    for module in pkgutil.iter_modules(package.__path__):
        if module.ispkg:
            importlib.import_module(f"{__package__}.{module.name}")


def available_methods() -> dict[str, type[Method]]:
    """`{name: method class}` of every registered method, sorted by name."""
    _import_method_packages()
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
    typed = {key: coerce_option(cls.config_class, key, value) for key, value in options.items()}
    try:
        return cls(cls.config_class(**typed))
    except (TypeError, ArithmeticError) as exc:  # a check in __post_init__ met a value it cannot compare
        raise ConfigError(f"method {name!r}: inconsistent options {typed}: {exc}") from None


def _option_types(config_class: type[MethodConfig]) -> dict[str, Any]:
    return typing.get_type_hints(config_class)


def type_name(hint: Any) -> str:
    """`float`, `int or none`, ... as a user reads it in `moepress methods NAME` and in errors."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args and type(None) in typing.get_args(hint):
        return " or ".join(type_name(a) for a in args) + " or none"
    return getattr(hint, "__name__", str(hint))


def coerce_option(config_class: type[MethodConfig], name: str, value: Any) -> Any:
    """`value` as the type the config field `name` declares; a `ConfigError` naming that type if it is
    not one (an int is accepted for a float, "none"/null for an optional field; never a silent cast)."""
    hint = _option_types(config_class).get(name)
    if hint is None:
        return value
    allowed = typing.get_args(hint) or (hint,)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if type(None) in allowed:
            return None
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is str and isinstance(value, str):
            return value
    raise ConfigError(f"option {name} expects {type_name(hint)}, got {value!r}")


def describe_options(cls: type[Method]) -> list[dict[str, str]]:
    """Each config option of method `cls` with its type, default and help (field metadata)."""
    types = _option_types(cls.config_class)
    rows = []
    for f in dataclasses.fields(cls.config_class):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        text = cls.ratio_help if f.name == "ratio" else f.metadata.get("help", "")
        rows.append({"name": f.name, "type": type_name(types[f.name]), "default": repr(default), "help": text})
    return rows
