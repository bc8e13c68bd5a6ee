"""A compression run as one value: `CompressJob` (docs/architecture.md#the-run).

Everything a `compress` call decides before work starts is decided here, once, for the CLI and the
Python API alike: the method and its typed config (`methods.build_method`), what the method needs
(`Method.requirements()`), the calibration, the layers and budget, propagation, device, dtype
(`auto` = the stored weights'), where hidden states wait, offload, the statistics cache, quantization
and the output directory. `CompressJob.build` checks them all and loads no model and no tensor (the
method registry imports torch; nothing else here touches it); `api.run_job` then runs the job as
it is, and `moepress.json` records it (`describe()`, entry `job`).

A job is frozen: a run never changes it, so what is recorded is what ran.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from .. import checks
from .plan import check_budget, parse_layer_spec

if TYPE_CHECKING:
    from ..methods import Method, MethodConfig, Requirements



@dataclass(frozen=True)
class CalibrationSpec:
    """The calibration text and how it is packed and batched.

    source: a file, folder, .jsonl or saved dataset (None = the built-in text), or an object
        `calib.build_calibration` accepts (API). samples x seq_len tokens (seq_len None = min(2048,
        the model's max positions)), shuffled with `seed`; `batch_size` sequences per forward.
        `generated`: that many more sequences sampled from the source model itself and added
        (`calib.generated`: widens a one-domain calibration text; 0 = none)."""

    source: Any = None
    samples: int = 128
    seq_len: int | None = None
    seed: int = 0
    batch_size: int = 8
    generated: int = 0


@dataclass(frozen=True)
class LayerSelection:
    """Which MoE layers are compressed (`layers`: SPEC or None = all) and how the kept experts are
    spread over them (`budget`: uniform | auto, with `floor`): plan.py."""

    layers: str | None = None
    budget: str = "uniform"
    floor: int | None = None


@dataclass(frozen=True)
class CompressJob:
    """One checked compression run (module doc). Build it with `CompressJob.build`.

    model: a local directory, a hub id, or a model object (API); `source`: its name for records.
    method / config / requirements: the registry name, its typed config and what it declares.
    offload: True = decoder layers stream from disk (bounded memory), False = resident, or a work
        directory (streaming, that directory kept); "auto" is resolved here.
    propagation: "compressed" | "original" (the method's own unless given), or "none" when the
        method reads no calibration.
    device: the resolved compute device ("cpu", "cuda:0"); dtype: the output dtype's name.
    stats_cache: the statistics-cache directory (None = no cache, also for a method without
        calibration).
    quantize: None or the weight-only scheme applied to the experts afterwards.
    out: the checked output directory (None: give it to `save`).
    """

    model: Any = field(repr=False)
    source: str | None
    method: str
    config: MethodConfig
    requirements: Requirements
    calibration: CalibrationSpec
    selection: LayerSelection
    propagation: str
    device: str
    dtype: str
    hidden_on: str = "auto"
    offload: bool | Path = False
    stats_cache: Path | None = None
    quantize: str | None = None
    out: checks.OutputDir | None = None
    tokenizer: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def build(cls, model, method: str, ratio: float | None = None, *, experts: int | None = None, calib=None,
              samples: int = 128, seq_len: int | None = None, seed: int = 0, batch_size: int = 8,
              tokenizer=None, dtype="auto", offload: bool | str | Path = "auto", out: str | Path | None = None,
              overwrite: bool = False, device="auto", hidden_on: str = "auto", quantize: str | None = "none",
              layers: str | None = None, budget: str = "uniform", budget_floor: int | None = None,
              stats_cache=True, propagate: str | None = None, calib_generated: int = 0, **options) -> CompressJob:
        """Check every argument of `moepress.compress` (its docstring says what each means) and
        resolve the defaults that depend on the method or the source; raises an `InputError` /
        `ConfigError` naming the first problem. Nothing is loaded and nothing written."""
        check_arguments(model, method, ratio, experts=experts, calib=calib, samples=samples, seq_len=seq_len,
                        batch_size=batch_size, dtype=dtype, quantize=quantize, layers=layers, budget=budget,
                        budget_floor=budget_floor, propagate=propagate, hidden_on=hidden_on, out=out,
                        overwrite=overwrite, calib_generated=calib_generated)
        # Only now the modules that import torch (the method registry, devices, loading, the cache):
        # a mistyped argument is answered in a fraction of a second, before torch has loaded.
        from ..devices import resolve_device
        from .plan import check_method_plan
        from ..loading import check_model_files, dtype_name, resolve_dtype
        from ..methods import build_method

        scheme = None if quantize in (None, "none") else quantize
        local = isinstance(model, (str, Path))
        source = str(model) if local else getattr(model, "name_or_path", None)
        if local:
            check_model_files(model)
        target = checks.check_output_dir(out, source, overwrite) if out is not None else None  # checked: resolved
        method_obj = build_method(method, ratio=ratio, experts=experts, **options)
        needs = method_obj.requirements()
        check_method_plan(method_obj.name, needs, layers, budget)
        return cls(
            model=model, source=source, method=method_obj.name, config=method_obj.config, requirements=needs,
            calibration=CalibrationSpec(calib, samples, seq_len, seed, batch_size, int(calib_generated)),
            selection=LayerSelection(layers, budget, budget_floor),
            propagation=_propagation(propagate, needs), device=str(resolve_device(device)),
            dtype=dtype_name(resolve_dtype(dtype, model)), hidden_on=hidden_on,
            offload=_offload(offload, model, method_obj.name, needs, scheme),
            stats_cache=_stats_cache_dir(stats_cache) if needs.calibration else None,
            quantize=scheme, out=target, tokenizer=tokenizer)

    def new_method(self) -> Method:
        """A fresh instance of the job's method (it keeps per-run state such as D²-MoE's Fisher)."""
        from ..methods import build_method

        return build_method(self.method, **dataclasses.asdict(self.config))

    @property
    def streams(self) -> bool:
        """Whether decoder layers stream from disk (bounded memory)."""
        return self.offload is not False

    def describe(self) -> dict[str, Any]:
        """The job as moepress.json records it (entry `job`): JSON values only."""
        calibration = dataclasses.asdict(self.calibration)
        if not isinstance(calibration["source"], (str, Path, type(None))):
            calibration["source"] = type(calibration["source"]).__name__
        return {
            "model": self.source,
            "method": self.method,
            "config": dataclasses.asdict(self.config),
            "requirements": self.requirements.describe(),
            "calibration": {k: (str(v) if isinstance(v, Path) else v) for k, v in calibration.items()},
            "selection": dataclasses.asdict(self.selection),
            "propagation": self.propagation,
            "device": self.device,
            "dtype": self.dtype,
            "hidden_on": self.hidden_on,
            "offload": str(self.offload) if isinstance(self.offload, Path) else self.offload,
            "stats_cache": None if self.stats_cache is None else str(self.stats_cache),
            "quantize": self.quantize,
            "out": None if self.out is None else str(self.out.path),
        }


def check_arguments(model, method: str, ratio: float | None = None, *, experts: int | None = None, calib=None,
                    samples: int = 128, seq_len: int | None = None, batch_size: int = 8, dtype="auto",
                    quantize: str | None = "none", layers: str | None = None, budget: str = "uniform",
                    budget_floor: int | None = None, propagate: str | None = None,
                    hidden_on: str = "auto", out: str | Path | None = None, overwrite: bool = False,
                    calib_generated: int = 0) -> None:
    """The checks of `CompressJob.build` that need neither torch nor the method registry: names,
    numbers, choices and paths, in the order a user reads the command line. Raises an `InputError`
    naming the first problem."""
    checks.check_method_name(method)
    checks.check_ratio(ratio, experts)
    checks.check_positive(samples=samples, seq_len=seq_len, batch_size=batch_size)
    if not isinstance(calib_generated, int) or isinstance(calib_generated, bool) or calib_generated < 0:
        raise checks.InputError(f"--calib-generated must be a whole number >= 0 (sequences), got {calib_generated!r}")
    if isinstance(dtype, str):
        checks.check_dtype(dtype)
    _check_choice("quantize", quantize if quantize is not None else "none", checks.QUANTIZE_CHOICES)
    checks.check_method_quantize(method, quantize)
    local = isinstance(model, (str, Path))
    if local:
        checks.check_model_source(str(model))
    if out is not None:
        checks.check_output_dir(out, str(model) if local else getattr(model, "name_or_path", None), overwrite)
    if isinstance(calib, (str, Path)):
        checks.check_calibration_source(str(calib))
    if layers is not None:
        parse_layer_spec(layers)
    check_budget(budget, budget_floor)
    if propagate is not None:
        _check_choice("propagate", propagate, checks.PROPAGATIONS)
    _check_choice("hidden_on", hidden_on, checks.HIDDEN_PLACEMENTS)


def _check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise checks.ConfigError(f"{option} must be one of {', '.join(choices)}, got {value!r}")


def _propagation(propagate: str | None, needs: Requirements) -> str:
    if not needs.calibration:
        return "none"
    return propagate or needs.propagation


def _offload(offload, model, method: str, needs: Requirements, scheme: str | None) -> bool | Path:
    """True / False / a work directory, from the `offload` argument ("auto": stream a local model
    directory unless the method needs the whole model resident or the experts are quantized after)."""
    automatic = isinstance(offload, str) and offload == "auto"
    if scheme is not None:
        if not (automatic or offload is False):
            raise checks.ConfigError("quantize needs the compressed model in memory: run it without offload "
                              "(offload=False / --no-offload, or the default)")
        return False
    local_dir = isinstance(model, (str, Path)) and Path(str(model)).expanduser().is_dir()
    if automatic:
        return local_dir and not needs.resident_model
    if not offload:
        return False
    if not local_dir:
        raise checks.ConfigError(f"offload reads decoder layers from a local model directory; {model!r} is not one "
                          f"(use offload=False or 'auto')")
    if needs.resident_model:
        raise checks.ConfigError(f"method {method!r} needs the whole model in memory (e.g. for gradients); "
                          f"run it without offload")
    return True if offload is True else Path(offload)


def _stats_cache_dir(stats_cache) -> Path | None:
    """The cache directory of the `stats_cache` argument: True / "auto" = the default one, a path,
    a `StatsCache`'s own, or None / False = no cache."""
    from .cache import StatsCache, default_directory

    if isinstance(stats_cache, StatsCache):
        return stats_cache.directory
    if stats_cache is None or stats_cache is False:
        return None
    if stats_cache is True or stats_cache == "auto":
        return default_directory()
    return Path(stats_cache).expanduser()
