"""The Python API of docs/design.md#python-api: `compress`, `load`, `methods`, and the result object.

Every decision about how a run goes is taken here, once, for the CLI and for Python callers
alike: where the output goes (checked before any work), whether decoder layers stream from disk
(`offload="auto"`), which loader opens the model (`loading.load_pretrained`), whether calibration
text and a tokenizer are needed at all (`Method.needs_calibration`), which device computes
(`devices.resolve_device`, checked first), and whether this is one rank of a data-parallel run
(`torchrun`: the process group is joined here; every rank compresses, rank 0 alone saves).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import json
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import distributed, output_lock
from .arch import family_of, parameter_counts
from .calib import build_calibration
from .devices import resolve_device
from .export import OutputDir, check_output_dir, custom_layers, save_checkpoint
from .run.plan import build_plan, selection_record
from .run.store import open_streaming
from .loading import DTYPES, dtype_disagreement, dtype_name, load, load_pretrained, load_tokenizer, resolve_dtype
from .methods import ConfigError, Method, Requirements
from .run.pipeline import compress_layers
from .quantization import quantize_experts
from .record import library_versions, read_record, stage_figures
from .run import CompressJob
from .run.cache import StatsCache


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
    lock: object = None  # rank 0's lock on `out` (output_lock.py), held from `compress` to the end of `save`
    job: CompressJob | None = None  # the checked run that made it

    @property
    def requirements(self) -> Requirements:
        """What the method declared for this run (`Method.requirements()`): e.g. `next_step`."""
        return self.job.requirements if self.job is not None else self.method.requirements()

    @property
    def parameter_counts(self) -> dict:
        return parameter_counts(self.model)

    def save(self, out: str | Path | None = None, overwrite: bool = False) -> Path:
        """Write the checkpoint + tokenizer + moepress.json atomically; returns the directory.

        `out` defaults to the location given to `compress(out=...)`.
        In a data-parallel run rank 0 writes and the other ranks wait for it (all return the path).
        """
        if distributed.is_main_process():
            target = self._output(out, overwrite)
            try:
                with output_lock.acquire(target.path):
                    path = save_checkpoint(self.model, target, method_name=self.method.name,
                                           export=self.record["export"],
                                           record=self.record, tokenizer=self.tokenizer, source=self.source,
                                           store=self.store, timed_stage="save")
            finally:
                if self.lock is not None:
                    self.lock.release()
        else:  # only rank 0 checks and writes: checking here would race with its writing
            path = Path(out).expanduser().resolve() if out is not None else self._output(None, overwrite).path
        distributed.barrier()
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
             batch_size: int = 8, tokenizer=None, dtype: torch.dtype | str = "auto",
             offload: bool | str | Path = "auto", out: str | Path | None = None, overwrite: bool = False,
             progress=None, log=None, device: str | torch.device = "auto", hidden_on: str = "auto",
             quantize: str | None = "none", layers: str | None = None, budget: str = "uniform",
             budget_floor: int | None = None, stats_cache=True, propagate: str | None = None,
             calib_generated: int = 0, **options) -> CompressionResult:
    """Compress `model` (path, hub id or model object) with registered method `method`.

    Args:
        ratio: fraction of routed-expert parameters removed (for `compressed_experts`: fraction of
            each token's activated experts replaced). `experts` keeps M experts per layer instead.
        calib: calibration source (file, folder, jsonl, saved dataset; None = built-in text).
            Ignored, like `tokenizer`, by a method that needs no calibration (`needs_calibration`).
        samples, seq_len: packed calibration sequences (seq_len default min(2048, max positions)).
        calib_generated: also sample that many sequences of `seq_len` tokens from the source model
            itself and add them to the calibration (`moepress.calib.generated`; 0 = none): a one-domain
            `calib` then no longer bends the fit toward its domain (issue 23: Compressed Experts'
            mini-experts). Sampling runs the whole model, so a bounded-memory run loads it once in
            full for that. Recorded in moepress.json (`job.calibration.generated`, the token hash).
        offload: bounded memory: decoder layers are read from the model directory one at a time and
            finished layers written to a work directory; the result's model is complete in its
            checkpoint after `save`. "auto" (default): on when `model` is a local directory and the
            method does not need the whole model resident; True / False force it; a directory path
            = on, with that work directory (kept after `save`). The default work directory is
            `.OUT.work` beside `out` (or a temporary one), removed once saved. Rerun with the work
            directory of an interrupted run and the same settings, finished layers are reused.
        out, overwrite: the output directory for `save()`, checked before any work is done.
        device: "auto" (this rank's GPU if there is one, else the CPU), "cpu", "cuda", "cuda:N":
            each decoder layer is computed there in turn (the model waits on the CPU).
        hidden_on: where calibration hidden states wait between layers: "auto", "cpu", "device".
        dtype: dtype of the result and its checkpoint: "auto" (default) = the source's own dtype, or
            "float32" / "float16" / "bfloat16" / a torch dtype; recorded as `dtype` in moepress.json.
            The work itself (forwards, statistics, solves) runs in float32 whatever the source.
        progress: optional `progress(done, total, description)` called after each layer (None or
            False: none).
        log: optional `log(message)` for notices (a resumed run, a cleared work directory).
        quantize: "none" (default), "int8" or "fp8": weight-only quantization of the routed experts after
            compression (moepress/quantization.py: torchao numerics, one scale per output channel per
            expert); the checkpoint is then a custom one (`trust_remote_code=True` for from_pretrained).
            Quantizing needs the compressed model in memory: offload="auto" becomes resident, offload=True
            is refused. Recorded as `quantization` in moepress.json (scheme, library + version, bytes).
        layers: SPEC of the decoder layers to compress (`"12-47"`, `"0,2,4"`; MoE layers only); the
            others stay bit-identical. `ratio`/`experts` then apply within those layers.
        budget: "uniform" (every layer keeps the same count) or "auto" (pruning/merging: the same total,
            spread by each layer's measured sensitivity; `run/plan.py`); budget_floor: the fewest
            experts "auto" leaves a layer (default max(top-k, ceil(N/4))).
        stats_cache: where per-layer calibration statistics are kept and reused across runs
            (`moepress.run.cache`): True (default) = `$MOEPRESS_STATS_CACHE` or the user cache's
            `stats/`, a directory, or False/None = no cache. Hits and misses go into moepress.json.
        propagate: None (default: the method's own, "compressed" for all but HC-SMoE), "compressed"
            (each layer's calibration inputs come from the compressed layers before it) or "original" (from the uncompressed model: statistics are then the
            same for every ratio and method, hence fully reusable from the cache). Recorded as
            `propagation`.
        options: the method's own config fields.
    Under `torchrun` the calibration sequences are split across ranks and statistics summed
    (moepress/distributed.py); call `save` on every rank (rank 0 writes).
    Returns: a `CompressionResult`; call `.save(out)`.
    """
    job = CompressJob.build(model, method, ratio, experts=experts, calib=calib, samples=samples, seq_len=seq_len,
                            seed=seed, batch_size=batch_size, tokenizer=tokenizer, dtype=dtype, offload=offload,
                            out=out, overwrite=overwrite, device=device, hidden_on=hidden_on, quantize=quantize,
                            layers=layers, budget=budget, budget_floor=budget_floor, stats_cache=stats_cache,
                            propagate=propagate, calib_generated=calib_generated, **options)
    return run_job(job, progress=progress, log=log)


def run_job(job: CompressJob, *, progress=None, log=None) -> CompressionResult:
    """Run a checked `CompressJob` (`compress` builds one from its arguments; the CLI builds its own).

    progress: optional `progress(done, total, description)` after each layer (None/False: none);
    log: optional `log(message)` for notices. Returns a `CompressionResult`; call `.save()`."""
    t_start = time.perf_counter()
    log = log or (lambda message: None)
    torch.manual_seed(job.calibration.seed)
    compute_device = torch.device(job.device)
    joined_before = distributed.world_size() > 1
    if distributed.init_from_environment(compute_device) and not joined_before:
        atexit.register(distributed.shutdown)  # a gloo rank that exits inside its group aborts
    if not distributed.is_main_process() or progress is False:
        progress = None  # one progress display per run, rank 0's (False = none, as finetune's)
    if progress is not None and not callable(progress):
        raise ConfigError("progress must be None/False or a callable progress(done, total, description)")
    cache = StatsCache(job.stats_cache, log=log) if job.stats_cache is not None else None
    t0 = time.perf_counter()
    target = job.out
    lock = output_lock.acquire(target.path, main_process=distributed.is_main_process()) if target else None
    try:
        work = _work_dir(job)
        temporary = work is not None and work[1] and target is None
        with _drop_unused_work_dir(work, temporary):
            result = _compress(job, work, progress, log, t_start, t0, cache)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    result.lock = lock
    if temporary and distributed.is_main_process():  # nobody can resume from it: it goes with an unsaved result
        weakref.finalize(result, shutil.rmtree, str(work[0]), True)
    return result


@contextlib.contextmanager
def _drop_unused_work_dir(work: tuple[Path, bool] | None, temporary: bool = False):
    """A run that fails before finishing any layer leaves no work directory it created behind (one
    with finished layers stays, so the same command resumes from it; a `temporary` one, which no
    later run can name, always goes)."""
    try:
        yield
    except BaseException:
        if work is not None and work[1] and work[0].is_dir() and (
                temporary or not any(work[0].glob("layer-*.safetensors"))):
            shutil.rmtree(work[0], ignore_errors=True)
        raise


def _compress(job: CompressJob, work, progress, log, t_start: float, t0: float, cache=None) -> CompressionResult:
    """The body of `run_job` once the output is locked (see there)."""
    method = job.new_method()
    needs = job.requirements
    out_dtype = DTYPES[job.dtype]
    compute_device = torch.device(job.device)
    model_obj, tok, store = _open_model(job, work)
    stages = {"load": stage_figures(t0)}
    calibration = _calibrate(job, model_obj, tok, stages)
    _check_shards(calibration)
    t0 = time.perf_counter()
    plan = build_plan(model_obj, method, calibration, store=store, batch_size=job.calibration.batch_size,
                      device=compute_device, layers=job.selection.layers, budget=job.selection.budget,
                      floor=job.selection.floor)
    if plan.budget == "auto":
        stages["sensitivity"] = stage_figures(t0)
    if store is not None:
        resumed = store.resume(_run_key(job, calibration, plan.key()))
        stages.get("calibration", stages["load"])["resumed_layers"] = resumed
        if resumed:
            log(f"resumed: {resumed} finished layer(s) reused from {store.work_dir}")
        elif store.cleared:
            log(f"cleared {store.work_dir}: it held layers of a different run (other model, method, options "
                f"or calibration)")
    before = parameter_counts(model_obj)
    t0 = time.perf_counter()
    records = compress_layers(model_obj, method, calibration, batch_size=job.calibration.batch_size,
                              progress=progress, store=store, device=compute_device, hidden_on=job.hidden_on,
                              plan=plan, stats_cache=cache,
                              propagation=job.propagation if needs.calibration else None)
    finalized = method.finalize(model_obj, records)
    stages["compress"] = stage_figures(t0)
    if store is not None:
        _refuse_forward_on_disk_layers(model_obj)
    model_obj.to(out_dtype)
    model_obj.config.dtype = out_dtype
    quantization = None
    if job.quantize is not None:
        t0 = time.perf_counter()
        quantization = quantize_experts(model_obj, job.quantize)
        stages["quantize"] = stage_figures(t0)
    after = parameter_counts(model_obj)
    record = {
        "moepress_record": 1,
        "method": job.method,
        "config": dataclasses.asdict(job.config),
        # quantized experts live in moepress blocks (auto_map)
        "export": "custom" if quantization is not None else finalized.export,
        "source_model": job.source,
        "family": family_of(model_obj).model_type,
        "calibration": calibration.describe() if calibration is not None else None,
        "seed": job.calibration.seed,
        "dtype": job.dtype,
        "source_dtype_note": dtype_disagreement(job.source),
        "compute_dtype": "float32",
        "batch_size": job.calibration.batch_size,
        "propagation": job.propagation,
        "stats_cache": cache.describe() if cache is not None else None,
        "layers": {str(k): v for k, v in records.items()},
        "parameters": _parameters_record(before, after, records),
        "layer_selection": selection_record(plan, before, after),
        "budget": plan.budget_record(),
        "versions": library_versions(),
        "stages": stages,
        "wall_seconds": round(time.perf_counter() - t_start, 3),
        "offload": store is not None,
        "device": job.device,
        "world_size": distributed.world_size(),
        "job": job.describe(),
    }
    if quantization is not None:
        record["quantization"] = quantization
    return CompressionResult(model_obj, tok, method, records, record, job.source, store, job.out, job=job)


def _calibrate(job: CompressJob, model: nn.Module, tokenizer, stages: dict):
    """The packed calibration set (its stage figures into `stages`), or None for a method that reads none."""
    if not job.requirements.calibration:
        return None
    t0 = time.perf_counter()
    spec = job.calibration
    seq_len = spec.seq_len
    if seq_len is None:
        seq_len = min(2048, int(getattr(model.config, "max_position_embeddings", 2048)))
    calibration = build_calibration(tokenizer, spec.source, samples=spec.samples, seq_len=seq_len, seed=spec.seed)
    if spec.generated:
        calibration = _with_generated(job, model, tokenizer, calibration, seq_len)
    stages["calibration"] = stage_figures(t0)
    return calibration


def _with_generated(job: CompressJob, model: nn.Module, tokenizer, calibration, seq_len: int):
    """`calibration` plus `job.calibration.generated` sequences sampled from the source model (rank 0
    samples, every rank gets the same tokens). A streamed run's layers are on the meta device, so the
    model is loaded once in full for the sampling and freed."""
    from .calib.generated import sample_sequences
    from .run.store import release_freed_memory

    spec = job.calibration
    ids = None
    if distributed.is_main_process():
        sampler = model
        if job.streams:
            sampler, _ = load_pretrained(job.model, dtype=torch.float32, require_tokenizer=False)
        sampler.to(torch.device(job.device))
        ids = sample_sequences(sampler, tokenizer, spec.generated, seq_len, seed=spec.seed)
        if sampler is not model:
            del sampler
            release_freed_memory()
        else:
            model.to("cpu")
    ids = distributed.broadcast_object(ids)
    return dataclasses.replace(calibration, input_ids=torch.cat([calibration.input_ids, ids.to(torch.long)]),
                               generated=spec.generated)


def _check_shards(calibration) -> None:
    """Every data-parallel rank needs at least one calibration sequence."""
    ranks = distributed.world_size()
    if calibration is not None and calibration.input_ids.shape[0] < ranks:
        raise ConfigError(f"{calibration.input_ids.shape[0]} calibration sequences cannot be split across "
                          f"{ranks} ranks; use --samples >= {ranks} (or fewer ranks)")


def _work_dir(job: CompressJob) -> tuple[Path, bool] | None:
    """`(work directory, created for this run)` of a bounded-memory run, or None for a resident one."""
    if not job.streams:
        return None
    if isinstance(job.offload, Path):
        return job.offload, False
    if job.out is not None:
        return job.out.path.parent / f".{job.out.path.name}.work", True
    # one directory for all data-parallel ranks: rank 0's
    return Path(distributed.broadcast_object(tempfile.mkdtemp(prefix="moepress-work-")
                                             if distributed.is_main_process() else None)), True


def _parameters_record(before: dict, after: dict, records: dict) -> dict:
    """`parameters` of moepress.json; with `after_nonzero` when the method zeroes weights in place
    (MoE-Pruner: dense tensors, so `after` alone would not show what was removed)."""
    from .ops.nonzero import nonzero_from_records

    out = {"before": before, "after": after}
    nonzero = nonzero_from_records(records, after)
    if nonzero is not None:
        out["after_nonzero"] = nonzero
    return out


def _open_model(job: CompressJob, work: tuple[Path, bool] | None):
    """`(model in float32, tokenizer or None, layer store or None)`; the tokenizer is optional for a
    method that reads no calibration text. A model object of another dtype is converted in place
    (compression edits it in place anyway); streamed layers are written in the job's dtype."""
    needs_text = job.requirements.calibration
    if work is None:
        model_obj, tok = load_pretrained(job.model, dtype=torch.float32, tokenizer=job.tokenizer,
                                         require_tokenizer=needs_text)
        return model_obj.float(), tok, None
    model_obj, store = open_streaming(job.model, work[0], dtype=torch.float32, owns_work_dir=work[1],
                                      output_dtype=DTYPES[job.dtype])
    return model_obj, load_tokenizer(job.model, job.tokenizer, required=needs_text), store


def _refuse_forward_on_disk_layers(model: nn.Module) -> None:
    """A streamed result's layers are on the meta device: say so instead of a meta-tensor error."""
    def refuse(module, args, kwargs):
        raise RuntimeError("this result's decoder layers live on disk (bounded-memory run): save it and load "
                           "the checkpoint (`moepress.load(result.save(out))`), or compress with offload=False")

    model.register_forward_pre_hook(refuse, with_kwargs=True)


def _run_key(job: CompressJob, calibration, plan_key=None) -> str:
    """Identity of a run for resuming: same source, method, config, calibration tokens, batching, dtype,
    propagation (and layer plan: selected layers and per-layer counts, when given)."""
    h = hashlib.sha256()
    propagate = job.propagation if calibration is not None else "compressed"
    h.update(json.dumps([str(job.source), job.method, dataclasses.asdict(job.config), job.calibration.batch_size,
                         f"torch.{job.dtype}"] + ([propagate] if propagate != "compressed" else []),
                        sort_keys=True, default=str).encode())
    if plan_key is not None:
        h.update(json.dumps(plan_key, default=str).encode())
    if calibration is not None:
        h.update(calibration.input_ids.numpy().tobytes())
    return h.hexdigest()


def methods() -> dict[str, str]:
    """`{name: one-line summary}` of every registered method."""
    from .methods import available_methods

    return {name: cls.summary for name, cls in available_methods().items()}


def finetune_checkpoint(checkpoint: str | Path, data, out: str | Path, config, *, samples: int = 4096,
                        seq_len: int = 256, resume: bool = False, progress: bool = True,
                        overwrite: bool = False, device: str | torch.device = "auto",
                        dtype: torch.dtype | str = "auto") -> Path:
    """Load a moepress result, fine-tune it on packed text from `data`, save a loadable checkpoint.

    `config` is a `methods.compressed_experts.finetune.FinetuneConfig`. Training checkpoints go to
    `<out>.state/` (beside the output, which is replaced atomically at the end); the output holds
    the model (same custom export as `compress`), its tokenizer, moepress.json (the source record
    plus a "finetune" entry) and `loss.png`. Training runs in float32 on `device` ("auto" | "cpu" |
    "cuda" | "cuda:N"); the output is written from the CPU in `dtype` ("auto" = the checkpoint's own).
    """
    out = Path(out).expanduser()
    compute_device = resolve_device(device)
    output_lock.refuse_if_busy(out)  # a live run on `out` is the problem to name, not its half-made output
    target = check_output_dir(out, checkpoint, overwrite)
    with output_lock.acquire(target.path):  # to the end of the save: a second run on `out` is refused
        return _finetune_to(checkpoint, data, target, config, samples, seq_len, resume, progress, compute_device,
                            dtype)


def _finetune_to(checkpoint, data, target, config, samples: int, seq_len: int, resume: bool, progress: bool,
                 compute_device: torch.device, dtype) -> Path:
    """The body of `finetune_checkpoint` once its output is checked and locked."""
    from .methods.compressed_experts.finetune import finetune, finetune_record, plot_losses, remove_state

    out = target.path
    out_dtype = resolve_dtype(dtype, checkpoint)
    model, tokenizer = load_pretrained(checkpoint, dtype=torch.float32)
    model.to(compute_device)
    ids = build_calibration(tokenizer, data, samples=samples, seq_len=seq_len, seed=config.seed).input_ids
    state_dir = out.with_name(out.name + ".state")
    result = finetune(model, ids, config, state_dir=state_dir, resume=resume, progress=progress, keep_state=True)
    model.to("cpu")
    record = read_record(checkpoint) or {"source_model": str(checkpoint)}
    record["finetune"] = finetune_record(config, result, "builtin:calib" if data is None else str(data))
    record["dtype"] = dtype_name(out_dtype)
    model.to(out_dtype)
    model.config.dtype = out_dtype
    custom = bool(custom_layers(model))  # custom blocks, or stock blocks with per-layer expert counts
    path = save_checkpoint(model, target, method_name=record.get("method", "finetune"),
                           export="custom" if custom else "stock", record=record, tokenizer=tokenizer)
    plot_losses(result.losses, path / "loss.png", validation=result.validation)
    remove_state(state_dir)  # only once the output is written: a failed save can still --resume
    return path


def quantize(model, scheme: str = "int8", *, out=None, overwrite: bool = False, dtype="auto"):
    """Quantization alone (no compression): see `moepress.quantization.quantize`."""
    from .quantization import quantize as _quantize

    return _quantize(model, scheme, out=out, overwrite=overwrite, dtype=dtype)



def replay(record, *, out=None, overwrite: bool = False, progress=None, log=None) -> CompressionResult:
    """Redo the compression recorded in `record` (a moepress.json file or its checkpoint folder), bit
    for bit: `moepress compress --replay`. Refused before any work when the run cannot be reproduced
    here (another world size), and before saving when its calibration tokens or method config differ
    from the record's (`rerun.py`)."""
    from .rerun import replay as _replay

    return _replay(record, out=out, overwrite=overwrite, progress=progress, log=log)


__all__ = ["CompressionResult", "compress", "finetune_checkpoint", "load", "load_pretrained", "methods",
           "quantize", "read_record", "replay"]
