"""The Python API of DESIGN.md §1: `compress`, `load`, `methods`, and the result object.

Every decision about how a run goes is taken here, once, for the CLI and for Python callers
alike: where the output goes (checked before any work), whether decoder layers stream from disk
(`offload="auto"`), which loader opens the model (`loading.load_pretrained`), whether calibration
text and a tokenizer are needed at all (`Method.needs_calibration`).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .arch import family_of, parameter_counts
from .calib import build_calibration
from .export import OutputDir, check_output_dir, save_checkpoint
from .loading import load, load_pretrained, load_tokenizer
from .methods import ConfigError, Method, build_method
from .pipeline import compress_layers
from .record import library_versions, read_record, stage_figures


@dataclass
class CompressionResult:
    """A compressed model in memory, its per-layer decisions and the replayable record.

    After a bounded-memory run (`record["offload"]`), the model's decoder layers live on disk
    (meta device here) until `save` writes them into the checkpoint; load that with `load(path)`.
    """

    model: nn.Module
    tokenizer: object
    method: Method
    records: dict[int, dict]
    record: dict = field(default_factory=dict)
    source: str | None = None
    store: object = None  # StreamingLayers of a bounded-memory run (layers then live on disk)
    out: OutputDir | None = None  # the output location given to `compress`, already checked

    @property
    def parameter_counts(self) -> dict:
        return parameter_counts(self.model)

    def save(self, out: str | Path | None = None, overwrite: bool = False) -> Path:
        """Write the checkpoint + tokenizer + moepress.json atomically; returns the directory.

        `out` defaults to the location given to `compress(out=...)`."""
        target = self._output(out, overwrite)
        path = save_checkpoint(self.model, target, method_name=self.method.name, export=self.method.export,
                               record=self.record, tokenizer=self.tokenizer, source=self.source,
                               store=self.store, timed_stage="save")
        if self.store is not None:
            self.store.close()  # the layer shards now live in the checkpoint
        return path

    def _output(self, out, overwrite: bool) -> OutputDir:
        if out is None:
            if self.out is None:
                raise ValueError("save(out): give the output directory (or pass out= to compress)")
            return self.out
        if self.out is not None and Path(out).expanduser().resolve() == self.out.path:
            return self.out
        return check_output_dir(out, self.source, overwrite)


def compress(model, method: str, ratio: float | None = None, *, experts: int | None = None,
             calib=None, samples: int = 128, seq_len: int | None = None, seed: int = 0,
             batch_size: int = 8, tokenizer=None, dtype: torch.dtype | None = torch.float32,
             offload: bool | str | Path = "auto", out: str | Path | None = None, overwrite: bool = False,
             progress=None, **options) -> CompressionResult:
    """Compress `model` (path, hub id or model object) with registered method `method`.

    Args:
        ratio: fraction of routed-expert parameters removed (for `compressed_experts`: fraction of
            each token's activated experts replaced). `experts` keeps M experts per layer instead.
        calib: calibration source (file, folder, jsonl, saved dataset; None = built-in text).
            Ignored, like `tokenizer`, by a method that needs no calibration (`needs_calibration`).
        samples, seq_len: packed calibration sequences (seq_len default min(2048, max positions)).
        offload: bounded memory: decoder layers are read from the model directory one at a time and
            finished layers written to a work directory; the result's model is complete in its
            checkpoint after `save`. "auto" (default): on when `model` is a local directory and the
            method does not need the whole model resident; True / False force it; a directory path
            = on, with that work directory (kept after `save`). The default work directory is
            `.OUT.work` beside `out` (or a temporary one), removed once saved. Rerun with the work
            directory of an interrupted run and the same settings, finished layers are reused.
        out, overwrite: the output directory for `save()`, checked before any work is done.
        options: the method's own config fields.
    Returns: a `CompressionResult`; call `.save(out)`.
    """
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    method_obj = build_method(method, ratio=ratio, experts=experts, **options)
    source = str(model) if isinstance(model, (str, Path)) else getattr(model, "name_or_path", None)
    target = check_output_dir(out, source, overwrite) if out is not None else None
    t0 = time.perf_counter()
    work = _work_dir(offload, model, method_obj, target)
    model_obj, tok, store = _open_model(model, method_obj, dtype, tokenizer, work)
    stages = {"load": stage_figures(t0)}
    calibration = _calibrate(method_obj, model_obj, tok, calib, samples, seq_len, seed, stages)
    if store is not None:
        resumed = store.resume(_run_key(source, method_obj, calibration, batch_size))
        stages.get("calibration", stages["load"])["resumed_layers"] = resumed
    before = parameter_counts(model_obj)
    t0 = time.perf_counter()
    records = compress_layers(model_obj, method_obj, calibration, batch_size=batch_size, progress=progress,
                              store=store)
    stages["compress"] = stage_figures(t0)
    if store is not None:
        _refuse_forward_on_disk_layers(model_obj)
    record = {
        "moepress_record": 1,
        "method": method_obj.name,
        "config": dataclasses.asdict(method_obj.config),
        "export": method_obj.export,
        "source_model": source,
        "family": family_of(model_obj).model_type,
        "calibration": calibration.describe() if calibration is not None else None,
        "seed": seed,
        "batch_size": batch_size,
        "propagation": "compressed" if calibration is not None else "none",
        "layers": {str(k): v for k, v in records.items()},
        "parameters": {"before": before, "after": parameter_counts(model_obj)},
        "versions": library_versions(),
        "stages": stages,
        "wall_seconds": round(time.perf_counter() - t_start, 3),
        "offload": store is not None,
    }
    return CompressionResult(model_obj, tok, method_obj, records, record, source, store, target)


def _calibrate(method: Method, model: nn.Module, tokenizer, calib, samples: int, seq_len: int | None, seed: int,
               stages: dict):
    """The packed calibration set (its stage figures into `stages`), or None for a method that reads none."""
    if not method.needs_calibration:
        return None
    t0 = time.perf_counter()
    if seq_len is None:
        seq_len = min(2048, int(getattr(model.config, "max_position_embeddings", 2048)))
    calibration = build_calibration(tokenizer, calib, samples=samples, seq_len=seq_len, seed=seed)
    stages["calibration"] = stage_figures(t0)
    return calibration


def _work_dir(offload, model, method: Method, target: OutputDir | None) -> tuple[Path, bool] | None:
    """`(work directory, created for this run)` of a bounded-memory run, or None for a resident one."""
    local_dir = isinstance(model, (str, Path)) and Path(str(model)).expanduser().is_dir()
    if isinstance(offload, str) and offload == "auto":
        if not local_dir or method.requires_resident_model:
            return None
    elif not offload:
        return None
    elif not local_dir:
        raise ConfigError(f"offload reads decoder layers from a local model directory; {model!r} is not one "
                          f"(use offload=False or 'auto')")
    elif method.requires_resident_model:
        raise ConfigError(f"method {method.name!r} needs the whole model in memory (e.g. for gradients); "
                          f"run it without offload")
    if offload not in (True, "auto"):
        return Path(offload), False
    if target is not None:
        return target.path.parent / f".{target.path.name}.work", True
    return Path(tempfile.mkdtemp(prefix="moepress-work-")), True


def _open_model(model, method: Method, dtype, tokenizer, work: tuple[Path, bool] | None):
    """`(model, tokenizer or None, layer store or None)`; the tokenizer is optional for a method
    that reads no calibration text."""
    if work is None:
        model_obj, tok = load_pretrained(model, dtype=dtype, tokenizer=tokenizer,
                                         require_tokenizer=method.needs_calibration)
        return model_obj, tok, None
    from .layer_store import open_streaming

    model_obj, store = open_streaming(model, work[0], dtype=dtype or torch.float32, owns_work_dir=work[1])
    return model_obj, load_tokenizer(model, tokenizer, required=method.needs_calibration), store


def _refuse_forward_on_disk_layers(model: nn.Module) -> None:
    """A streamed result's layers are on the meta device: say so instead of a meta-tensor error."""
    def refuse(module, args, kwargs):
        raise RuntimeError("this result's decoder layers live on disk (bounded-memory run): save it and load "
                           "the checkpoint (`moepress.load(result.save(out))`), or compress with offload=False")

    model.register_forward_pre_hook(refuse, with_kwargs=True)


def _run_key(source, method: Method, calibration, batch_size: int) -> str:
    """Identity of a run for resuming: same source, method, config, calibration tokens, batching."""
    import hashlib
    import json

    h = hashlib.sha256()
    h.update(json.dumps([str(source), method.name, dataclasses.asdict(method.config), batch_size],
                        sort_keys=True, default=str).encode())
    if calibration is not None:
        h.update(calibration.input_ids.numpy().tobytes())
    return h.hexdigest()


def methods() -> dict[str, str]:
    """`{name: one-line summary}` of every registered method."""
    from .methods import available_methods

    return {name: cls.summary for name, cls in available_methods().items()}


def finetune_checkpoint(checkpoint: str | Path, data, out: str | Path, config, *, samples: int = 4096,
                        seq_len: int = 256, resume: bool = False, progress: bool = True,
                        overwrite: bool = False) -> Path:
    """Load a moepress result, fine-tune it on packed text from `data`, save a loadable checkpoint.

    `config` is a `methods.compressed_experts.finetune.FinetuneConfig`. Training checkpoints go to
    `<out>.state/` (beside the output, which is replaced atomically at the end); the output holds
    the model (same custom export as `compress`), its tokenizer, moepress.json (the source record
    plus a "finetune" entry) and `loss.png`.
    """
    from .methods.compressed_experts.finetune import finetune, finetune_record, plot_losses

    out = Path(out).expanduser()
    target = check_output_dir(out, checkpoint, overwrite)
    model, tokenizer = load_pretrained(checkpoint)
    ids = build_calibration(tokenizer, data, samples=samples, seq_len=seq_len, seed=config.seed).input_ids
    result = finetune(model, ids, config, state_dir=out.with_name(out.name + ".state"), resume=resume,
                      progress=progress)
    record = read_record(checkpoint) or {"source_model": str(checkpoint)}
    record["finetune"] = finetune_record(config, result, "builtin:calib" if data is None else str(data))
    custom = any(getattr(m, "is_moepress_block", False) for m in model.modules())
    path = save_checkpoint(model, target, method_name=record.get("method", "finetune"),
                           export="custom" if custom else "stock", record=record, tokenizer=tokenizer)
    plot_losses(result.losses, path / "loss.png")
    return path


__all__ = ["CompressionResult", "compress", "finetune_checkpoint", "load", "load_pretrained", "methods",
           "read_record"]
