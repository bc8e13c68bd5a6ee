"""The `moepress` command line (DESIGN.md §1). Thin: parse, call the API, print."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .zoo.cli import zoo_app

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
        None, "--offload/--no-offload", help="read layers from disk one at a time (bounded memory; resumable "
        "from .OUT.work); default: on for a model directory, unless the method needs the whole model resident"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
):
    """Compress MODEL with one method and save a checkpoint that reloads."""
    import moepress
    from moepress.progress import layer_progress

    try:
        options = _parse_opts(opt, recipe)
        with layer_progress(quiet) as progress:
            result = moepress.compress(model, method, ratio, experts=experts, calib=calib, samples=samples,
                                       seq_len=seq_len, seed=seed, batch_size=batch_size, progress=progress,
                                       offload="auto" if offload is None else offload, out=out,
                                       overwrite=overwrite, **options)
        path = result.save()
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
    speed: bool = typer.Option(False, "--speed/--no-speed", help="also measure prefill/decode tokens/s"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the report as JSON here"),
    limit: Optional[float] = typer.Option(None, "--limit", help="lm-eval items per task (quick runs)"),
):
    """Perplexity, multiple-choice tasks, parameter counts and speed of MODEL (and --baseline)."""
    import moepress

    try:
        report = moepress.evaluate(model, ppl=ppl or (), tasks=tasks, seq_len=seq_len, stride=stride,
                                   batch_size=batch_size, speed=speed, baseline=baseline,
                                   lm_eval_limit=int(limit) if limit and limit >= 1 else limit,
                                   log=lambda message: console.log(message))
    except (ValueError, FileNotFoundError, ImportError, RuntimeError, OSError) as exc:
        _fail(exc)
    Console().print(report.table())
    if json_path is not None:
        Console().print(f"report: {report.save_json(json_path)}")


@app.command()
def finetune(
    checkpoint: Path = typer.Argument(..., help="moepress output (or any supported model) to fine-tune"),
    data: Optional[Path] = typer.Option(None, help="text: file, folder, jsonl or saved dataset (default: built-in)"),
    out: Optional[Path] = typer.Option(None, help="output directory (default: CHECKPOINT-finetuned)"),
    recipe: str = typer.Option("vectors", help="vectors (vectors only, 200 steps) | paper (whole model, lr 2e-5, "
                                               "2 epochs, warmup 0.03, cosine: the paper's run_sft.py)"),
    train: Optional[str] = typer.Option(None, help="vectors | all | model (all but the vectors); default: the recipe's"),
    distill: bool = typer.Option(False, "--distill", help="KL to the original top-k model's logits"),
    steps: Optional[int] = typer.Option(None, help="optimizer steps (default: the recipe's)"),
    batch_size: int = typer.Option(8),
    seq_len: int = typer.Option(256),
    samples: int = typer.Option(4096, help="packed training sequences drawn from --data"),
    lr: Optional[float] = typer.Option(None, help="peak lr (default: the recipe's; 1e-2 vectors, 3e-4 otherwise)"),
    save_every: int = typer.Option(0, help="checkpoint every N steps"),
    resume: bool = typer.Option(False, "--resume", help="continue from OUT.state/latest"),
    seed: int = typer.Option(0),
    overwrite: bool = typer.Option(False, "--overwrite"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Fine-tune a compressed model (Compressed Experts vectors, or everything) on packed text."""
    from moepress.api import finetune_checkpoint
    from moepress.methods.compressed_experts.finetune import FinetuneConfig

    try:
        config = FinetuneConfig(recipe=recipe, steps=steps, batch_size=batch_size, lr=lr, train=train,
                                distill=distill, save_every=save_every, seed=seed)
        path = finetune_checkpoint(checkpoint, data, out or checkpoint.with_name(checkpoint.name + "-finetuned"),
                                   config, samples=samples, seq_len=seq_len, resume=resume, progress=not quiet,
                                   overwrite=overwrite or resume)
    except (ValueError, FileNotFoundError, OSError) as exc:
        _fail(exc)
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
    ppl: Optional[str] = typer.Option(None, help="comma list of texts (default: built-in held-out domains)"),
    tasks: str = typer.Option("next_chunk", help="comma list of tasks"),
):
    """Compress MODEL with every method x ratio and compare them side by side (table + plot)."""
    from moepress.bench import run_grid, write_report

    try:
        rows = run_grid(model, [m.strip() for m in methods.split(",") if m.strip()],
                        [float(r) for r in ratios.split(",") if r.strip()], out, calib=calib, samples=samples,
                        seq_len=seq_len, ppl=ppl.split(",") if ppl else None,
                        tasks=[t for t in tasks.split(",") if t.strip()], log=console.print)
    except (ValueError, FileNotFoundError, OSError) as exc:
        _fail(exc)
    md, png = write_report(rows, out)
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
