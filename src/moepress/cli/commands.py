"""The commands that read models and print: methods, inspect, demo, eval, finetune, bench (and zoo)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .. import checks
from ..zoo.cli import zoo_app
from .app import DTYPE_HELP, STATS_CACHE_HELP, app, check_propagate, console, log_notice, stats_cache_arg
from .errors import user_errors


@app.command("methods")
def list_methods(name: Optional[str] = typer.Argument(None, help="a method: show its --opt options")):
    """List the registered methods with one line each, or one method's options (type, default, help)."""
    from rich.table import Table

    with user_errors():
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
    with user_errors():
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
    with user_errors():
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
    with user_errors():
        checks.check_positive(seq_len=seq_len, stride=stride, batch_size=batch_size)
        checks.check_dtype(dtype)
        checks.check_model_source(model)
        if baseline is not None:
            checks.check_model_source(baseline)
        import moepress

        report = moepress.evaluate(model, ppl=ppl or (), tasks=tasks, seq_len=seq_len, stride=stride,
                                   batch_size=batch_size, speed=speed, baseline=baseline, dtype=dtype,
                                   lm_eval_limit=int(limit) if limit and limit >= 1 else limit,
                                   log=log_notice, device=device, progress=False if quiet else None)
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
    with user_errors():
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
    with user_errors():
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
        check_propagate(propagate)
        from moepress.bench import run_grid, write_report

        rows = run_grid(model, names, ratio_values, out, calib=calib, samples=samples, seq_len=seq_len,
                        ppl=ppl.split(",") if ppl else None, tasks=[t for t in tasks.split(",") if t.strip()],
                        dtype=dtype, log=console.print, device=device,
                        stats_cache=stats_cache_arg(stats_cache, no_stats_cache), propagate=propagate,
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
