"""`moepress bench`: a method x ratio grid on one model -> table (markdown + JSON) and a plot."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def run_grid(model: str, methods: list[str], ratios: list[float], out: Path, *, calib=None, samples: int = 64,
             seq_len: int = 256, ppl: Optional[list[str]] = None, tasks: Optional[list[str]] = None,
             mc_per_domain: int = 16) -> list[dict]:
    """Compress `model` with every (method, ratio), evaluate each the same way; rows also go to `out`."""
    import moepress
    from moepress.eval import evaluate
    from moepress.zoo import builtin_domains

    ppl = ppl or builtin_domains()
    tasks = tasks if tasks is not None else ["next_chunk"]
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(ppl=ppl, tasks=tasks, seq_len=seq_len, mc_per_domain=mc_per_domain)
    rows = [{"method": "original", "ratio": 0.0, **_summary(evaluate(model, **settings)), "seconds": 0.0}]
    for method in methods:
        for ratio in ratios:
            t0 = time.perf_counter()
            result = moepress.compress(model, method, ratio, calib=calib, samples=samples, seq_len=seq_len)
            seconds = time.perf_counter() - t0
            report = evaluate(result.model, tokenizer=result.tokenizer, **settings)
            rows.append({"method": method, "ratio": ratio, **_summary(report), "seconds": round(seconds, 1)})
            console.print(f"{method} @ {ratio}: ppl {rows[-1]['ppl']:.3f}")
            (out / "bench.json").write_text(json.dumps(rows, indent=2))
    return rows


def _summary(report) -> dict:
    import math

    ppls = [v for k, v in report.metrics.items() if k.startswith("ppl/")]
    accs = {k: v for k, v in report.metrics.items() if k.endswith("/acc")}
    return {"ppl": math.exp(sum(math.log(v) for v in ppls) / len(ppls)) if ppls else float("nan"),
            "acc": sum(accs.values()) / len(accs) if accs else float("nan"),
            "routed_params": report.metrics.get("params/routed_experts"),
            "active_params": report.metrics.get("params/active_per_token")}


def write_report(rows: list[dict], out: Path) -> tuple[Path, Path]:
    """`bench.md` (table) and `bench.png` (perplexity vs ratio per method) in `out`."""
    lines = ["| method | ratio | ppl (geo mean) | acc | routed params | active params | compress s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['ratio']:.2f} | {r['ppl']:.3f} | {r['acc']:.3f} | "
                     f"{r['routed_params']:,} | {r['active_params']:,} | {r['seconds']} |")
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    base = next(r["ppl"] for r in rows if r["method"] == "original")
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "original"):
        pts = [(0.0, base)] + [(r["ratio"], r["ppl"]) for r in rows if r["method"] == method]
        ax.plot(*zip(*pts), marker="o", label=method)
    ax.set_xlabel("fraction of routed-expert parameters removed")
    ax.set_ylabel("held-out perplexity (geometric mean)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "bench.png", dpi=120)
    plt.close(fig)
    return out / "bench.md", out / "bench.png"


def bench_command(
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
    rows = run_grid(model, [m.strip() for m in methods.split(",") if m.strip()],
                    [float(r) for r in ratios.split(",") if r.strip()], out, calib=calib, samples=samples,
                    seq_len=seq_len, ppl=ppl.split(",") if ppl else None,
                    tasks=[t for t in tasks.split(",") if t.strip()])
    md, png = write_report(rows, out)
    table = Table(title=f"moepress bench: {model}")
    for col in ("method", "ratio", "ppl", "acc", "routed params"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["method"], f"{r['ratio']:.2f}", f"{r['ppl']:.3f}", f"{r['acc']:.3f}", f"{r['routed_params']:,}")
    Console().print(table)
    Console().print(f"report: {md}, {png}")
