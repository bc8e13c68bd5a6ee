"""``moepress eval MODEL``: registered on the main typer app as ``app.command("eval")(eval_command)``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def eval_command(
    model: str = typer.Argument(..., help="Model directory (or hub id when online)."),
    ppl: Optional[list[str]] = typer.Option(
        None, "--ppl", help="Perplexity texts: files or built-ins (heldout:linux, linux, calib). Repeatable or comma list."),
    tasks: str = typer.Option("", "--tasks", help="Comma list: next_chunk (local_mc), domain_mc, or lm-eval task names."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Model to compare against (retained %)."),
    seq_len: int = typer.Option(256, "--seq-len", help="Window length in tokens for perplexity."),
    stride: Optional[int] = typer.Option(None, "--stride", help="Window stride (default: seq-len)."),
    batch_size: int = typer.Option(8, "--batch-size"),
    speed: bool = typer.Option(False, "--speed/--no-speed", help="Also measure prefill/decode tokens/s."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON here."),
    limit: Optional[float] = typer.Option(None, "--limit", help="lm-eval items per task (quick runs)."),
) -> None:
    """Perplexity, multiple-choice tasks, parameter counts and speed of MODEL (and --baseline)."""
    from rich.console import Console

    from .harness import evaluate

    console = Console()
    try:
        report = evaluate(model, ppl=ppl or (), tasks=tasks, seq_len=seq_len, stride=stride, batch_size=batch_size,
                          speed=speed, baseline=baseline,
                          lm_eval_limit=int(limit) if limit and limit >= 1 else limit,
                          log=lambda message: console.log(message))
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(1) from None
    console.print(report.table())
    if json_path is not None:
        typer.echo(f"report: {report.save_json(json_path)}")
