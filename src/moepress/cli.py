"""The `moepress` command line (DESIGN.md §1). Thin: parse, call the API, print."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Compress Mixture-of-Experts LLMs and measure what it cost.")
console = Console(stderr=True)


def _parse_opts(opts: list[str] | None, recipe: Path | None) -> dict:
    import yaml

    out = {}
    if recipe is not None:
        data = yaml.safe_load(Path(recipe).read_text()) or {}
        if not isinstance(data, dict):
            raise typer.BadParameter(f"{recipe}: expected a mapping of option: value")
        out.update(data)
    for item in opts or []:
        if "=" not in item:
            raise typer.BadParameter(f"--opt expects NAME=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


@contextlib.contextmanager
def layer_progress(quiet: bool, description: str = "compressing"):
    """A rich progress bar fed by the pipeline's `progress(done, total, text)` callback."""
    if quiet:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("layers"),
                  TimeRemainingColumn(), console=console, transient=False) as bar:
        task = bar.add_task(description, total=None)

        def update(done, total, text):
            bar.update(task, completed=done, total=total, description=f"{description} {text}")

        yield update


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(code=2)


@app.command()
def compress(
    model: str = typer.Argument(..., help="model directory or hub id"),
    method: str = typer.Option(..., "--method", "-m", help="registry name (see `moepress methods`)"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory (written atomically)"),
    ratio: Optional[float] = typer.Option(None, help="fraction of routed-expert parameters removed"),
    experts: Optional[int] = typer.Option(None, help="routed experts kept per layer (replaces --ratio)"),
    calib: Optional[str] = typer.Option(None, help="calibration file, folder, jsonl or saved dataset"),
    samples: int = typer.Option(128, help="calibration sequences"),
    seq_len: Optional[int] = typer.Option(None, help="tokens per sequence (default min(2048, max positions))"),
    seed: int = typer.Option(0),
    batch_size: int = typer.Option(8, help="sequences per forward batch"),
    opt: Optional[list[str]] = typer.Option(None, "--opt", help="method option NAME=VALUE (repeatable)"),
    recipe: Optional[Path] = typer.Option(None, help="YAML file of method options"),
    overwrite: bool = typer.Option(False, help="replace a non-empty --out"),
    offload: Optional[bool] = typer.Option(
        None, help="read layers from disk one at a time (bounded memory); default: on, unless the method "
        "needs the whole model resident"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
):
    """Compress MODEL with one method and save a checkpoint that reloads."""
    import shutil

    import moepress
    from moepress.export import check_output_dir
    from moepress.methods import get_method

    work = out.expanduser().resolve().parent / f".{out.name}.work"
    try:
        options = _parse_opts(opt, recipe)
        check_output_dir(out, model, overwrite)
        if offload is None:
            offload = Path(model).is_dir() and not get_method(method).requires_resident_model
        with layer_progress(quiet) as progress:
            result = moepress.compress(model, method, ratio, experts=experts, calib=calib, samples=samples,
                                       seq_len=seq_len, seed=seed, batch_size=batch_size, progress=progress,
                                       offload=work if offload else False, **options)
        path = result.save(out, overwrite=overwrite)
        shutil.rmtree(work, ignore_errors=True)
    except (ValueError, FileNotFoundError, OSError) as exc:
        _fail(exc)
    before, after = result.record["parameters"]["before"], result.record["parameters"]["after"]
    table = Table(title=f"{method} on {model}")
    for col in ("", "total params", "routed-expert params", "active params / token"):
        table.add_column(col, justify="right")
    for name, c in (("before", before), ("after", after)):
        table.add_row(name, f"{c['total']:,}", f"{c['routed_experts']:,}", f"{c['active_per_token']:,}")
    Console().print(table)
    Console().print(f"checkpoint: {path}")


@app.command("methods")
def list_methods():
    """List the registered methods with one line each."""
    import moepress
    from moepress.methods import get_method

    table = Table(title="moepress methods")
    table.add_column("name")
    table.add_column("output")
    table.add_column("what it does")
    for name, summary in moepress.methods().items():
        table.add_row(name, get_method(name).export, summary)
    Console().print(table)


@app.command()
def inspect(
    model: str = typer.Argument(..., help="model directory or hub id"),
    calib: Optional[str] = typer.Option(None, help="calibration source (default: built-in text)"),
    samples: int = typer.Option(32),
    seq_len: int = typer.Option(256),
    plot: Optional[Path] = typer.Option(None, help="folder for an expert-usage heatmap PNG"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the usage table as JSON"),
):
    """Per-layer expert usage on calibration data, as a table (and a heatmap with --plot)."""
    from moepress.inspect import expert_usage, usage_heatmap, usage_table

    try:
        usage = expert_usage(model, calib=calib, samples=samples, seq_len=seq_len)
    except (ValueError, FileNotFoundError, OSError) as exc:
        _fail(exc)
    Console().print(usage_table(usage))
    if json_out is not None:
        import json

        json_out.write_text(json.dumps(usage, indent=2))
    if plot is not None:
        Console().print(f"heatmap: {usage_heatmap(usage, plot)}")


@app.command()
def demo(
    out: Path = typer.Option(Path("out/demo"), help="where the compressed checkpoint goes"),
    method: str = typer.Option("reap", help="method to demonstrate"),
    ratio: float = typer.Option(0.5),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """The whole job on built-in defaults: compress the reference model, evaluate before and after."""
    from moepress.demo import run_demo

    run_demo(out=out, method=method, ratio=ratio, quiet=quiet)


def _register_subsystems() -> None:
    """Sub-commands that live beside their subsystems (eval, zoo, finetune, bench)."""
    from moepress.bench import bench_command
    from moepress.eval.cli import eval_command
    from moepress.finetune import finetune_command
    from moepress.zoo.cli import zoo_app

    app.command("eval")(eval_command)
    app.add_typer(zoo_app, name="zoo", help="built-in corpus and trained reference MoE models")
    app.command("finetune")(finetune_command)
    app.command("bench")(bench_command)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_register_subsystems()

if __name__ == "__main__":
    app()
