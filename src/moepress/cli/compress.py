"""`moepress compress` (and `--replay`) and `moepress quantize`: the commands that write a checkpoint,
under the output lock, resumable after an interrupt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .. import checks, output_lock
from ..progress import is_printing_process
from .app import (DTYPE_HELP, QUANTIZE_HELP, STATS_CACHE_HELP, app, check_propagate, check_quantize, console,
                  log_notice, parse_opts, stats_cache_arg)
from .errors import (check_output, interrupts, lock_output, resume_command, signals_deferred, user_errors)


@app.command()
def compress(
    model: Optional[str] = typer.Argument(None, help="model directory or hub id (required unless --replay)"),
    method: Optional[str] = typer.Option(None, "--method", "-m", help="registry name (see `moepress methods`; "
                                         "required unless --replay)"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory (written atomically)"),
    ratio: Optional[float] = typer.Option(None, help="fraction of routed-expert parameters removed, in (0, 1) "
                                          "(of the --layers layers when given)"),
    experts: Optional[int] = typer.Option(None, help="routed experts kept per layer (replaces --ratio)"),
    calib: Optional[str] = typer.Option(None, help="calibration file, folder, jsonl or saved dataset"),
    samples: int = typer.Option(128, help="calibration sequences"),
    calib_generated: int = typer.Option(0, "--calib-generated", help="also calibrate on N sequences sampled from "
                                        "the model itself (widens a one-domain --calib)"),
    seq_len: Optional[int] = typer.Option(None, help="tokens per sequence (default min(2048, max positions))"),
    seed: int = typer.Option(0),
    batch_size: int = typer.Option(8, help="sequences per forward batch"),
    opt: Optional[list[str]] = typer.Option(None, "--opt", help="method option NAME=VALUE (repeatable; "
                                            "`moepress methods NAME` lists them)"),
    recipe: Optional[Path] = typer.Option(None, help="YAML file of method options"),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP + " (statistics and solves stay float32)"),
    overwrite: bool = typer.Option(False, help="replace a non-empty --out"),
    offload: Optional[bool] = typer.Option(
        None, "--offload/--no-offload", help="read layers from disk one at a time (bounded memory; resumable "
        "from .OUT.work); default: on for a model directory, unless the method needs the whole model resident"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N (auto: the first GPU if any)"),
    hidden_on: str = typer.Option("auto", "--hidden-on", help="where calibration hidden states wait between "
                                  "layers: auto | cpu | device"),
    quantize: str = typer.Option("none", "--quantize", help=QUANTIZE_HELP),
    layers: Optional[str] = typer.Option(None, "--layers", help="compress only these decoder layers (MoE ones), "
                                         "e.g. 12-47 or 0,2,4; the others stay bit-identical; --ratio/--experts then "
                                         "apply within them"),
    budget: str = typer.Option("uniform", "--budget", help="uniform: every layer keeps the same count; auto "
                               "(pruning/merging): the same total spread by each layer's measured sensitivity"),
    budget_floor: Optional[int] = typer.Option(None, "--budget-floor", help="fewest experts --budget auto leaves "
                                               "a layer (default max(top-k, ceil(N/4)))"),
    stats_cache: Optional[Path] = typer.Option(None, "--stats-cache", help=STATS_CACHE_HELP),
    no_stats_cache: bool = typer.Option(False, "--no-stats-cache", help="neither read nor write cached statistics"),
    propagate: Optional[str] = typer.Option(None, "--propagate", help="calibration inputs of each layer come from "
                                            "the 'compressed' layers before it (sequential) or the 'original' model "
                                            "(statistics then reusable across ratios and methods); default: the "
                                            "method's own (compressed; HC-SMoE: original)"),
    replay: Optional[Path] = typer.Option(None, "--replay", help="redo the run recorded in this moepress.json "
                                          "(or its checkpoint folder) bit for bit; give only --out with it"),
):
    """Compress MODEL with one method and save a checkpoint that reloads."""
    if replay is not None:
        given = [flag for flag, value in (("MODEL", model), ("--method", method), ("--ratio", ratio),
                                          ("--experts", experts), ("--calib", calib), ("--opt", opt),
                                          ("--recipe", recipe), ("--layers", layers)) if value]
        with user_errors():
            if given:
                raise checks.InputError(f"--replay redoes the recorded run as it was: give only --out (and "
                                        f"--overwrite, --quiet) with it, not {', '.join(given)}")
            from .. import rerun

            record = rerun.read(replay)
            rerun.check_world_size(record)
            check_output(out, record.get("source_model"), overwrite)
        return _replay(replay, record, out, overwrite, quiet)
    with user_errors():
        if model is None or method is None:
            raise checks.InputError("compress needs MODEL and --method (or --replay RECORD); see "
                                    "`moepress compress --help`")
        options = parse_opts(opt, recipe)
        check_quantize(quantize)  # the flags' own names in the message; CompressJob checks them again for the API
        check_propagate(propagate)
        from ..run import CompressJob

        output_lock.refuse_if_busy(out)  # a live run on --out is the problem to name, not its half-made output
        job = CompressJob.build(model, method, ratio, experts=experts, calib=calib, samples=samples, seq_len=seq_len,
                                seed=seed, batch_size=batch_size, dtype=dtype, out=out, overwrite=overwrite,
                                offload="auto" if offload is None else offload, device=device, hidden_on=hidden_on,
                                quantize=quantize, layers=layers, budget=budget, budget_floor=budget_floor,
                                stats_cache=stats_cache_arg(stats_cache, no_stats_cache), propagate=propagate,
                                calib_generated=calib_generated, **options)
    work = job.out.path.parent / f".{job.out.path.name}.work"
    with interrupts(lambda verb: _interrupted_line(verb, work, model)):
        with user_errors():
            lock = lock_output(out)
        with lock, user_errors(note=lambda exc: _leftover_note(work, exc)):
            from ..api import run_job  # torch: imported by CompressJob.build already, after the argument checks
            from ..progress import layer_progress

            with layer_progress(quiet) as progress:
                result = run_job(job, progress=progress, log=log_notice)
            with signals_deferred(f"the save of {out}"):
                path = result.save()
    if is_printing_process():
        _print_result(result, path, method, model)


def _replay(record_path: Path, record: dict, out: Path, overwrite: bool, quiet: bool) -> None:
    """`compress --replay`: the recorded run's arguments (rerun.py), the same lock, interrupts and save."""
    import moepress
    from moepress.progress import layer_progress

    source = record.get("source_model") or "?"
    work = out.expanduser().resolve().parent / f".{out.expanduser().resolve().name}.work"
    with interrupts(lambda verb: _interrupted_line(verb, work, source)):
        with user_errors():
            lock = lock_output(out)
        with lock, user_errors(note=lambda exc: _leftover_note(work, exc)):
            with layer_progress(quiet) as progress:
                result = moepress.replay(record_path, out=out, overwrite=overwrite, progress=progress, log=log_notice)
            with signals_deferred(f"the save of {out}"):
                path = result.save()
    if is_printing_process():
        _print_result(result, path, record["method"], source)
        console.print(f"replayed {record_path}: same source, method config, calibration tokens and settings")


def _leftover_note(work: Path, exc: BaseException) -> str | None:
    """A failed bounded-memory run keeps its finished layers in `work`: say so, and how to use them
    (a rerun fails alike until an input error is fixed, so then the fix comes first)."""
    if not (work.is_dir() and any(work.glob("layer-*.safetensors"))):
        return None
    kept = f"finished layers of this run are kept in {work}"
    if isinstance(exc, checks.DamagedSourceError):
        return f"{kept}: once the source model is repaired, the same command resumes from them (or delete that folder)"
    if isinstance(exc, checks.InputError):
        return f"{kept}: once the cause is fixed, the same command resumes from them (or delete that folder)"
    return f"{kept}: rerun the same command to resume from them, or delete that folder"


def _kept_layers(work: Path) -> int:
    """Finished layers recorded in a work directory's resume record (0 when there is none)."""
    try:
        return len(json.loads((work / "progress.json").read_text()).get("layers", {}))
    except (OSError, ValueError, AttributeError):
        return 0


def _decoder_layer_count(model: str) -> str:
    try:
        config = json.loads((Path(model).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return "?"
    count = config.get("num_hidden_layers", (config.get("text_config") or {}).get("num_hidden_layers"))
    return str(count) if count is not None else "?"


def _interrupted_line(verb: str, work: Path, model: str) -> str:
    """`interrupted: 3 of 8 layers kept in .OUT.work; resume with: moepress compress ...`"""
    kept = _kept_layers(work) if work.is_dir() else 0
    if kept:
        return (f"{verb}: {kept} of {_decoder_layer_count(model)} layers kept in {work}; resume with: "
                f"{resume_command()}")
    return (f"{verb}: nothing kept (no layer finished in {work}, or the run held the model in memory); rerun "
            f"with: {resume_command()}")


def _print_result(result, path: Path, method: str, model: str) -> None:
    from rich.table import Table

    before, after = result.record["parameters"]["before"], result.record["parameters"]["after"]
    table = Table(title=f"{method} on {model}")
    for col in ("", "total params", "routed-expert params", "active params / token"):
        table.add_column(col, justify="right")
    for name, c in (("before", before), ("after", after)):
        table.add_row(name, f"{c['total']:,}", f"{c['routed_experts']:,}", f"{c['active_per_token']:,}")
    nz = result.record["parameters"].get("after_nonzero")
    if nz:  # weights zeroed in dense tensors: the non-zeros are what a sparse format would store
        table.add_row("after, non-zeros", f"{nz['total']:,}", f"{nz['routed_experts']:,}", "–")
    Console().print(table)
    Console().print(f"checkpoint: {path} ({result.record.get('dtype', '?')})")
    quant = result.record.get("quantization")
    if quant:
        Console().print(f"experts quantized to {quant['storage_dtype']} ({quant['library']} {quant['library_version']}): "
                        f"expert bytes {quant['expert_bytes_before']:,} -> {quant['expert_bytes_after']:,}; load with "
                        f"moepress.load or from_pretrained(..., trust_remote_code=True)")
    if result.requirements.next_step:
        Console().print(f"next: {result.requirements.next_step.format(path=path)}")


@app.command("quantize")
def quantize_command(
    model: str = typer.Argument(..., help="model directory or hub id (uncompressed, or an unquantized moepress output)"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory (written atomically)"),
    scheme: str = typer.Option("int8", "--scheme", help="int8 | fp8 (weight-only, routed experts only)"),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP + " (everything not quantized)"),
    overwrite: bool = typer.Option(False, help="replace a non-empty --out"),
):
    """Quantize MODEL's routed experts without compressing (quantization alone) and save the checkpoint."""
    with user_errors():
        if scheme == "none":
            raise checks.InputError("--scheme must be int8 or fp8 (quantize with none would copy the model)")
        check_quantize(scheme)
        checks.check_dtype(dtype)
        checks.check_model_source(model)
        check_output(out, model, overwrite)
        lock = lock_output(out)
    with interrupts(lambda verb: f"{verb}: nothing was written to {out}; rerun with: {resume_command()}"):
        with lock, user_errors():
            import moepress
            from moepress.record import read_record

            path = moepress.quantize(model, scheme, out=out, overwrite=overwrite, dtype=dtype)
            entry = read_record(path)["quantization"]
    Console().print(f"quantized {len(entry['layers'])} MoE layers' experts to {entry['storage_dtype']} "
                    f"({entry['library']} {entry['library_version']}): expert bytes {entry['expert_bytes_before']:,} "
                    f"-> {entry['expert_bytes_after']:,}, model bytes {entry['model_bytes_before']:,} -> "
                    f"{entry['model_bytes_after']:,}")
    Console().print(f"checkpoint: {path} (load: moepress.load, or from_pretrained(..., trust_remote_code=True))")
