"""The `moepress` command line (docs/design.md#commands). Thin: check the arguments, call the API, print.

First contact is fast: this module imports neither torch nor moepress's heavy modules at load
time (`moepress --help` answers at once), and each command checks its arguments with
`moepress.checks` before importing anything heavy and before any progress bar is drawn. Any error
ends the command with one line `error: ...` on stderr and exit code 2 (no traceback; set
MOEPRESS_DEBUG=1 to see one); so does a usage error (`--ratio abc`), instead of typer's panel.

While a command runs, library noise is off (transformers' progress bars and logging below errors)
and each warning moepress itself raises prints as one `warning: ...` line, without a source
location; other libraries' Python warnings are not shown (progress.py; MOEPRESS_DEBUG=1 shows
everything). Under `torchrun` only rank 0 prints results, notices and warnings; another rank
prints an error only if rank 0 has not ended the run first (`_user_errors`).

`compress` and `quantize` hold a lock on their output (output_lock.py) and end on SIGINT / SIGTERM
with one line saying what was kept and the command that resumes, exit code 130 / 143.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from . import checks, output_lock
from .progress import is_printing_process, one_line_warnings, print_error, quiet_libraries
from .zoo.cli import zoo_app

console = Console(stderr=True)
RANK_ERROR_GRACE_S = 3.0  # how long a rank other than 0 leaves rank 0 to report an error first
class _MoepressGroup(TyperGroup):
    """The command group: a usage error is one `error:` line; every command runs with library noise
    silenced and warnings shown one line each (module doc)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        argv = ["moepress", *(sys.argv[1:] if args is None else args)]
        try:
            with output_lock.running_command(argv):  # the command a resume line repeats
                code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as exc:  # typer's own click: a usage error
            if type(exc).__name__ != "NoArgsIsHelpError":  # (that one has printed the help already)
                ctx = getattr(exc, "ctx", None)
                hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
                print_error(exc.format_message() + hint)
            sys.exit(getattr(exc, "exit_code", 2))
        except typer.Abort:
            console.print("Aborted!", highlight=False)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx):
        with quiet_libraries(), one_line_warnings():
            return super().invoke(ctx)


app = typer.Typer(cls=_MoepressGroup, add_completion=False, no_args_is_help=True,
                  help="Compress Mixture-of-Experts LLMs and measure what it cost.")
STATS_CACHE_HELP = ("directory of the calibration-statistics cache, reused across runs (default: "
                    "$MOEPRESS_STATS_CACHE or the user cache's stats/; cap MOEPRESS_STATS_CACHE_GB, default 20)")
QUANTIZE_HELP = ("weight-only quantization of the routed experts after compression: none | int8 | fp8 "
                 "(torchao; one scale per output channel per expert; the checkpoint then needs "
                 "trust_remote_code=True with from_pretrained; implies --no-offload)")
DTYPE_HELP = ("dtype of the output / of evaluation: auto (the dtype the weights are stored in; a half-precision "
              "model is evaluated in float32 on a CPU) | float32 | float16 | bfloat16")


def _parse_opts(opts: list[str] | None, recipe: Path | None) -> dict:
    import yaml

    out = {}
    if recipe is not None:
        if not Path(recipe).is_file():
            raise checks.InputError(f"--recipe {recipe} does not exist")
        try:
            data = yaml.safe_load(Path(recipe).read_text()) or {}
        except yaml.YAMLError as exc:
            raise checks.InputError(f"--recipe {recipe} is not valid YAML: {' '.join(str(exc).split())}") from None
        if not isinstance(data, dict):
            raise checks.InputError(f"--recipe {recipe}: expected a mapping of option: value")
        out.update(data)
    for item in opts or []:
        if "=" not in item:
            raise checks.InputError(f"--opt expects NAME=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        if re.fullmatch(r"\s*\d+:\d+\s*", value):  # YAML 1.1 would read "2:4" as the base-60 number 124
            out[key.strip().replace("-", "_")] = value.strip()
            continue
        try:
            out[key.strip().replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key.strip().replace("-", "_")] = value
    return out


def _fail(message: str) -> None:
    print_error(message)
    raise typer.Exit(code=2)


def _message(exc: BaseException) -> str:
    """One line for the user. Our own errors and the OS's carry a message meant for people; anything
    else is a bug in moepress or a library, said as such."""
    if isinstance(exc, (ValueError, OSError, RuntimeError, ImportError)):
        text = str(exc) or type(exc).__name__
        if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in text:
            text = f"{text}: {exc.filename}"
        return text
    return (f"unexpected {type(exc).__name__}: {exc} (a bug: please report it; MOEPRESS_DEBUG=1 shows the "
            f"traceback)")


@contextlib.contextmanager
def _user_errors(note=None):
    """Turn any exception into one `error:` line and exit 2; `note(exc)` may add to that line (e.g.
    what the run left). Under torchrun a rank other than 0 first waits `RANK_ERROR_GRACE_S`: rank 0
    meets the same error in that time as a rule, says it and ends, and torchrun then ends this rank
    silently; an error of this rank alone is printed after the wait, naming the rank."""
    try:
        yield
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - the user gets one line, the debug switch the traceback
        if os.environ.get("MOEPRESS_DEBUG"):
            raise
        extra = note(exc) if note is not None else None
        text = _message(exc) + (f"; {extra}" if extra else "")
        if not is_printing_process():
            time.sleep(RANK_ERROR_GRACE_S)
        print_error(text, prefix="[bold red]error:[/]" if is_printing_process() else
                    f"[bold red]error (rank {os.environ.get('RANK')}):[/]")
        raise typer.Exit(code=2) from None


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so every cleanup on the way out runs."""


def _raise_terminated(signum, frame):
    raise _Terminated()


_NOT_SET = object()


def _set_handler(signum: int, handler):
    """Install a signal handler (main thread only); returns the previous one, or `_NOT_SET`."""
    try:
        previous = signal.signal(signum, handler)
    except (ValueError, OSError):  # not the main thread
        return _NOT_SET
    return signal.SIG_DFL if previous is None else previous


@contextlib.contextmanager
def _interrupts(describe):
    """Ctrl-C (SIGINT) and SIGTERM end the command with one line, `describe(verb)` (what was kept and
    how to resume), and exit code 130 / 143. Cleanups (the output lock, a half-written save) run
    first, as for any exception."""
    previous = _set_handler(signal.SIGTERM, _raise_terminated)
    try:
        yield
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, _Terminated)
        if is_printing_process():
            console.print(escape(describe("terminated" if terminated else "interrupted")), soft_wrap=True,
                          highlight=False)
        raise typer.Exit(code=143 if terminated else 130) from None
    finally:
        if previous is not _NOT_SET:
            _set_handler(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_deferred(what: str):
    """SIGINT/SIGTERM wait while `what` runs (a save stopped midway would lose finished layers, which
    it is moving into the checkpoint); one line says so. The command then ends normally."""
    told = []

    def defer(signum, frame):
        if not told and is_printing_process():
            console.print(escape(f"{signal.Signals(signum).name} received: finishing {what} first"),
                          soft_wrap=True, highlight=False)
        told.append(signum)

    previous = {signum: _set_handler(signum, defer) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if handler is not _NOT_SET:
                _set_handler(signum, handler)


def _resume_command() -> str:
    """The command line that reruns this one (under torchrun: the torchrun line of one node)."""
    command = output_lock.command_line()
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and command.startswith("moepress "):
        command = f"torchrun --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', world)} -m {command}"
    return command


def _lock_output(out: Path):
    """This run's lock on `out` (rank 0's under torchrun), or an error naming the run that holds it."""
    return output_lock.acquire(out, main_process=is_printing_process())


def _check_output(out: Path, model, overwrite: bool) -> None:
    """`checks.check_output_dir`, but a live run on `out` is named first (its half-made output is not
    the problem to report)."""
    try:
        checks.check_output_dir(out, model, overwrite)
    except checks.ExportError:
        output_lock.refuse_if_busy(out)
        raise


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
        with _user_errors():
            if given:
                raise checks.InputError(f"--replay redoes the recorded run as it was: give only --out (and "
                                        f"--overwrite, --quiet) with it, not {', '.join(given)}")
            from . import rerun

            record = rerun.read(replay)
            rerun.check_world_size(record)
            _check_output(out, record.get("source_model"), overwrite)
        return _replay(replay, record, out, overwrite, quiet)
    with _user_errors():
        if model is None or method is None:
            raise checks.InputError("compress needs MODEL and --method (or --replay RECORD); see "
                                    "`moepress compress --help`")
        options = _parse_opts(opt, recipe)
        _check_quantize(quantize)  # the flags' own names in the message; CompressJob checks them again for the API
        _check_propagate(propagate)
        from .run import CompressJob

        output_lock.refuse_if_busy(out)  # a live run on --out is the problem to name, not its half-made output
        job = CompressJob.build(model, method, ratio, experts=experts, calib=calib, samples=samples, seq_len=seq_len,
                                seed=seed, batch_size=batch_size, dtype=dtype, out=out, overwrite=overwrite,
                                offload="auto" if offload is None else offload, device=device, hidden_on=hidden_on,
                                quantize=quantize, layers=layers, budget=budget, budget_floor=budget_floor,
                                stats_cache=_stats_cache_arg(stats_cache, no_stats_cache), propagate=propagate,
                                calib_generated=calib_generated, **options)
    work = job.out.path.parent / f".{job.out.path.name}.work"
    with _interrupts(lambda verb: _interrupted_line(verb, work, model)):
        with _user_errors():
            lock = _lock_output(out)
        with lock, _user_errors(note=lambda exc: _leftover_note(work, exc)):
            from .api import run_job  # torch: imported by CompressJob.build already, after the argument checks
            from .progress import layer_progress

            with layer_progress(quiet) as progress:
                result = run_job(job, progress=progress, log=_log)
            with _signals_deferred(f"the save of {out}"):
                path = result.save()
    if is_printing_process():
        _print_result(result, path, method, model)


def _check_quantize(scheme: str) -> None:
    if scheme not in checks.QUANTIZE_CHOICES:
        raise checks.InputError(f"--quantize must be one of {', '.join(checks.QUANTIZE_CHOICES)}; got {scheme!r}")


def _replay(record_path: Path, record: dict, out: Path, overwrite: bool, quiet: bool) -> None:
    """`compress --replay`: the recorded run's arguments (rerun.py), the same lock, interrupts and save."""
    import moepress
    from moepress.progress import layer_progress

    source = record.get("source_model") or "?"
    work = out.expanduser().resolve().parent / f".{out.expanduser().resolve().name}.work"
    with _interrupts(lambda verb: _interrupted_line(verb, work, source)):
        with _user_errors():
            lock = _lock_output(out)
        with lock, _user_errors(note=lambda exc: _leftover_note(work, exc)):
            with layer_progress(quiet) as progress:
                result = moepress.replay(record_path, out=out, overwrite=overwrite, progress=progress, log=_log)
            with _signals_deferred(f"the save of {out}"):
                path = result.save()
    if is_printing_process():
        _print_result(result, path, record["method"], source)
        console.print(f"replayed {record_path}: same source, method config, calibration tokens and settings")


def _log(message: str) -> None:
    """A notice of the API (a resumed run, a cleared work directory): rank 0 prints it."""
    if is_printing_process():
        console.print(escape(str(message)), soft_wrap=True, highlight=False)


def _check_propagate(propagate: str | None) -> None:
    if propagate is not None and propagate not in checks.PROPAGATIONS:
        raise checks.InputError(f"--propagate must be one of {', '.join(checks.PROPAGATIONS)}, got {propagate!r}")


def _stats_cache_arg(stats_cache: Path | None, no_stats_cache: bool):
    """The `stats_cache=` of the API: False with --no-stats-cache, the given directory, or True (default place)."""
    return False if no_stats_cache else (stats_cache or True)


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
                f"{_resume_command()}")
    return (f"{verb}: nothing kept (no layer finished in {work}, or the run held the model in memory); rerun "
            f"with: {_resume_command()}")


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
    with _user_errors():
        if scheme == "none":
            raise checks.InputError("--scheme must be int8 or fp8 (quantize with none would copy the model)")
        _check_quantize(scheme)
        checks.check_dtype(dtype)
        checks.check_model_source(model)
        _check_output(out, model, overwrite)
        lock = _lock_output(out)
    with _interrupts(lambda verb: f"{verb}: nothing was written to {out}; rerun with: {_resume_command()}"):
        with lock, _user_errors():
            import moepress
            from moepress.record import read_record

            path = moepress.quantize(model, scheme, out=out, overwrite=overwrite, dtype=dtype)
            entry = read_record(path)["quantization"]
    Console().print(f"quantized {len(entry['layers'])} MoE layers' experts to {entry['storage_dtype']} "
                    f"({entry['library']} {entry['library_version']}): expert bytes {entry['expert_bytes_before']:,} "
                    f"-> {entry['expert_bytes_after']:,}, model bytes {entry['model_bytes_before']:,} -> "
                    f"{entry['model_bytes_after']:,}")
    Console().print(f"checkpoint: {path} (load: moepress.load, or from_pretrained(..., trust_remote_code=True))")


@app.command("methods")
def list_methods(name: Optional[str] = typer.Argument(None, help="a method: show its --opt options")):
    """List the registered methods with one line each, or one method's options (type, default, help)."""
    from rich.table import Table

    with _user_errors():
        if name is not None:
            checks.check_method_name(name)
        import moepress
        from moepress.methods import describe_options, get_method

        if name is not None:
            cls = get_method(name)
            table = Table(title=f"{name}: {cls.summary}")
            for col in ("option", "type", "default", "help"):
                table.add_column(col)
            for row in describe_options(cls):
                table.add_row(f"--opt {row['name']}=" if row["name"] not in ("ratio", "experts") else
                              f"--{row['name']}", row["type"], row["default"], row["help"])
            Console().print(table)
            return
        table = Table(title="moepress methods (`moepress methods NAME` shows a method's options)")
        table.add_column("name")
        table.add_column("output")
        table.add_column("what it does")
        for method_name, summary in moepress.methods().items():
            table.add_row(method_name, get_method(method_name).export, summary)
    Console().print(table)


@app.command()
def inspect(
    model: str = typer.Argument(..., help="model directory or hub id"),
    calib: Optional[str] = typer.Option(None, help="calibration source (default: built-in text)"),
    samples: int = typer.Option(32),
    seq_len: int = typer.Option(256),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    plot: Optional[Path] = typer.Option(None, help="folder for an expert-usage heatmap PNG"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the usage table as JSON"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N (auto: the first GPU if any)"),
):
    """Per-layer expert usage on calibration data, as a table (and a heatmap with --plot)."""
    with _user_errors():
        checks.check_positive(samples=samples, seq_len=seq_len)
        checks.check_dtype(dtype)
        checks.check_model_source(model)
        checks.check_calibration_source(calib)
        from moepress.inspect import expert_usage, usage_heatmap, usage_table

        usage = expert_usage(model, calib=calib, samples=samples, seq_len=seq_len, dtype=dtype, device=device)
        Console().print(usage_table(usage))
        if json_out is not None:
            from moepress.record import strict_json

            json_out.write_text(strict_json(usage))
        if plot is not None:
            Console().print(f"heatmap: {usage_heatmap(usage, plot)}")


@app.command()
def demo(
    out: Path = typer.Option(Path("out/demo"), help="folder for the compressed checkpoints (one per method)"),
    methods: str = typer.Option("reap,d2moe,mergemoe,compressed_experts", "--methods",
                                help="comma list of methods to compare"),
    ratio: float = typer.Option(0.5, help="fraction of routed-expert parameters removed, in (0, 1)"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """The whole job on built-in defaults: compress the reference model, evaluate before and after."""
    names = [m.strip() for m in methods.split(",") if m.strip()]
    with _user_errors():
        for name in names:
            checks.check_method_name(name)
        checks.check_ratio(ratio, None)
        from moepress.demo import run_demo

        run_demo(out=out, methods=names, ratio=ratio, quiet=quiet)


@app.command("eval")
def evaluate(
    model: str = typer.Argument(..., help="model directory (or hub id when online)"),
    ppl: Optional[list[str]] = typer.Option(
        None, "--ppl", help="perplexity texts: files or built-ins (heldout:linux, linux, calib); repeatable or "
        "comma list"),
    tasks: str = typer.Option("", "--tasks", help="comma list: next_chunk (local_mc), domain_mc, or lm-eval tasks"),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="model to compare against (retained %)"),
    seq_len: int = typer.Option(256, "--seq-len", help="window length in tokens for perplexity"),
    stride: Optional[int] = typer.Option(None, "--stride", help="window stride (default: seq-len)"),
    batch_size: int = typer.Option(8, "--batch-size"),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    speed: bool = typer.Option(False, "--speed/--no-speed", help="also measure prefill/decode tokens/s"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the report as JSON here"),
    limit: Optional[float] = typer.Option(None, "--limit", help="lm-eval items per task (quick runs)"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N (auto: the first GPU if any)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
):
    """Perplexity, multiple-choice tasks, parameter counts and speed of MODEL (and --baseline)."""
    with _user_errors():
        checks.check_positive(seq_len=seq_len, stride=stride, batch_size=batch_size)
        checks.check_dtype(dtype)
        checks.check_model_source(model)
        if baseline is not None:
            checks.check_model_source(baseline)
        import moepress

        report = moepress.evaluate(model, ppl=ppl or (), tasks=tasks, seq_len=seq_len, stride=stride,
                                   batch_size=batch_size, speed=speed, baseline=baseline, dtype=dtype,
                                   lm_eval_limit=int(limit) if limit and limit >= 1 else limit,
                                   log=_log, device=device, progress=False if quiet else None)
        Console().print(report.table())
        if json_path is not None:
            Console().print(f"report: {report.save_json(json_path)}")


@app.command()
def finetune(
    checkpoint: Path = typer.Argument(..., help="moepress output (or any supported model) to fine-tune"),
    data: Optional[Path] = typer.Option(None, help="text: file, folder, jsonl or saved dataset (default: built-in)"),
    out: Optional[Path] = typer.Option(None, help="output directory (default: CHECKPOINT-finetuned)"),
    recipe: str = typer.Option("distill", help="distill (compressed experts only, KL to the original top-k model, "
                                               "200 steps) | vectors (the same on next-token loss) | paper (whole "
                                               "model, lr 2e-5, 2 epochs, warmup 0.03, cosine: the paper's run_sft.py)"),
    train: Optional[str] = typer.Option(None, help="vectors | all | model (all but the vectors); default: the recipe's"),
    distill: Optional[bool] = typer.Option(None, "--distill/--no-distill",
                                           help="KL to the original top-k model's logits (default: the recipe's)"),
    holdout: float = typer.Option(0.1, help="fraction of the packed sequences held out for validation loss (0 = none)"),
    generated: Optional[int] = typer.Option(None, help="training sequences sampled from the original top-k model, "
                                            "added to --data's (default: the recipe's; distill 128)"),
    steps: Optional[int] = typer.Option(None, help="optimizer steps (default: the recipe's)"),
    batch_size: int = typer.Option(8),
    seq_len: int = typer.Option(256),
    samples: int = typer.Option(4096, help="packed training sequences drawn from --data"),
    lr: Optional[float] = typer.Option(None, help="peak lr (default: the recipe's; 1e-2 vectors, 3e-4 otherwise)"),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP + " (training itself runs in float32)"),
    save_every: int = typer.Option(0, help="checkpoint every N steps"),
    resume: bool = typer.Option(False, "--resume", help="continue from OUT.state/latest"),
    seed: int = typer.Option(0),
    overwrite: bool = typer.Option(False, "--overwrite"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N (auto: the first GPU if any)"),
):
    """Fine-tune a compressed model (Compressed Experts vectors, or everything) on packed text."""
    out = out or checkpoint.with_name(checkpoint.name + "-finetuned")
    with _user_errors():
        checks.check_positive(steps=steps, batch_size=batch_size, seq_len=seq_len, samples=samples)
        checks.check_dtype(dtype)
        checks.check_model_source(str(checkpoint))
        checks.check_output_dir(out, checkpoint, overwrite or resume)
        checks.check_calibration_source(None if data is None else str(data))
        from moepress.api import finetune_checkpoint
        from moepress.methods.compressed_experts.finetune import FinetuneConfig

        config = FinetuneConfig(recipe=recipe, steps=steps, batch_size=batch_size, lr=lr, train=train,
                                distill=distill, save_every=save_every, seed=seed, holdout=holdout,
                                generated=generated)
        path = finetune_checkpoint(checkpoint, data, out, config, samples=samples, seq_len=seq_len, resume=resume,
                                   progress=not quiet, overwrite=overwrite or resume, dtype=dtype, device=device)
    Console().print(f"checkpoint: {path} (loss curve {path / 'loss.png'})")


@app.command()
def bench(
    model: str = typer.Argument(..., help="model directory"),
    methods: str = typer.Option("reap,mergemoe", help="comma-separated registry names"),
    ratios: str = typer.Option("0.25,0.5", help="comma-separated ratios"),
    out: Path = typer.Option(Path("report"), help="folder for bench.json, bench.md, bench.png"),
    calib: Optional[str] = typer.Option(None, help="calibration source (default: built-in text)"),
    samples: int = typer.Option(64),
    seq_len: int = typer.Option(256),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    ppl: Optional[str] = typer.Option(None, help="comma list of texts (default: built-in held-out domains)"),
    tasks: str = typer.Option("next_chunk", help="comma list of tasks"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N (auto: the first GPU if any)"),
    stats_cache: Optional[Path] = typer.Option(None, "--stats-cache", help=STATS_CACHE_HELP),
    no_stats_cache: bool = typer.Option(False, "--no-stats-cache", help="neither read nor write cached statistics"),
    propagate: Optional[str] = typer.Option(None, "--propagate", help="calibration inputs of each layer come from "
                                            "the 'compressed' layers before it or the 'original' model (statistics "
                                            "then shared by the whole grid); default: each method's own"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
):
    """Compress MODEL with every method x ratio and compare them side by side (table + plot)."""
    names = [m.strip() for m in methods.split(",") if m.strip()]
    with _user_errors():
        for name in names:
            checks.check_method_name(name)
        try:
            ratio_values = [float(r) for r in ratios.split(",") if r.strip()]
        except ValueError:
            raise checks.InputError(f"--ratios expects comma-separated numbers in (0, 1), got {ratios!r}") from None
        for ratio in ratio_values:
            checks.check_ratio(ratio, None)
        checks.check_positive(samples=samples, seq_len=seq_len)
        checks.check_dtype(dtype)
        checks.check_model_source(model)
        checks.check_report_dir(out, model)
        checks.check_calibration_source(calib)
        _check_propagate(propagate)
        from moepress.bench import run_grid, write_report

        rows = run_grid(model, names, ratio_values, out, calib=calib, samples=samples, seq_len=seq_len,
                        ppl=ppl.split(",") if ppl else None, tasks=[t for t in tasks.split(",") if t.strip()],
                        dtype=dtype, log=console.print, device=device,
                        stats_cache=_stats_cache_arg(stats_cache, no_stats_cache), propagate=propagate,
                        progress=False if quiet else None)
        md, png = write_report(rows, out)
    from rich.table import Table

    table = Table(title=f"moepress bench: {model}")
    for col in ("method", "ratio", "ppl", "acc", "routed params"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["method"], f"{r['ratio']:.2f}", f"{r['ppl']:.3f}", f"{r['acc']:.3f}", f"{r['routed_params']:,}")
    Console().print(table)
    Console().print(f"report: {md}, {png}")


app.add_typer(zoo_app, name="zoo", help="built-in corpus and trained reference MoE models")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if __name__ == "__main__":
    app()
