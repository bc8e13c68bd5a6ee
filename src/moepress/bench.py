"""`moepress bench`: a method x ratio grid on one model -> table (markdown + JSON) and a plot."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional


def run_grid(model: str, methods: list[str], ratios: list[float], out: Path, *, calib=None, samples: int = 64,
             seq_len: int = 256, ppl: Optional[list[str]] = None, tasks: Optional[list[str]] = None,
             mc_per_domain: int = 16, log: Callable[[str], None] = lambda message: None,
             device: str = "auto", dtype: str = "auto", stats_cache=True,
             propagate: str | None = None, progress: bool | None = None) -> list[dict]:
    """Compress `model` with every (method, ratio), evaluate each the same way; rows also go to `out`.

    `device` ("auto" | "cpu" | "cuda" | "cuda:N") computes compression and evaluation there.

    Each result is evaluated in memory, so compression keeps the model resident (offload=False).
    `dtype`: of the original's evaluation and of each result ("auto" = the source's).
    `stats_cache` (default on: the user cache) and `propagate` go to every `compress`: with
    `propagate="original"` the statistics of every layer are computed once for the whole grid (per
    distinct statistic), with "compressed" only those up to the first compressed layer are shared.
    `progress`: progress bars of the evaluations (None = when printing to a terminal;
    False = none, `--quiet`).
    """
    from .api import compress
    from .devices import resolve_device
    from .eval import evaluate
    from .resources import builtin_domains

    device = str(resolve_device(device))  # checked before any work

    ppl = ppl or builtin_domains()
    tasks = tasks if tasks is not None else ["next_chunk"]
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(ppl=ppl, tasks=tasks, seq_len=seq_len, mc_per_domain=mc_per_domain, device=device,
                    progress=progress)
    rows = [{"method": "original", "ratio": 0.0, **_summary(evaluate(model, dtype=dtype, **settings)), "seconds": 0.0}]
    for method in methods:
        for ratio in ratios:
            t0 = time.perf_counter()
            result = compress(model, method, ratio, calib=calib, samples=samples, seq_len=seq_len, offload=False,
                              device=device, dtype=dtype, stats_cache=stats_cache, propagate=propagate)
            seconds = time.perf_counter() - t0
            report = evaluate(result.model, tokenizer=result.tokenizer, **settings)
            rows.append({"method": method, "ratio": ratio, **_summary(report), "seconds": round(seconds, 1)})
            log(f"{method} @ {ratio}: ppl {rows[-1]['ppl']:.3f}")
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
