"""`moepress demo` / `make demo`: the project's core on built-in defaults, in a few minutes on a laptop CPU.

The committed reference model is compressed by a pruning baseline (REAP) and by the three methods
moepress is about (D²-MoE, MergeMoE, Compressed Experts), each at the same ratio; the original and
every result are evaluated the same way (perplexity on the built-in held-out texts, two
multiple-choice tasks) and shown in one table, parameters and quality side by side.

Compressed Experts runs with its default, fitted mini-experts standing in for each token's
lower-weighted activated experts (`aux_width=auto`); its vectors start at one and are not trained
here (`moepress finetune` would), so the row is the method before any training. Speed is left
out: on a model this small, timings are mostly noise.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

console = Console()
DEFAULT_METHODS = ("reap", "d2moe", "mergemoe", "compressed_experts")
LABELS = {"compressed_experts": "compressed_experts*"}  # * = fitted, not fine-tuned (caption)


def _reference_model() -> str:
    from .zoo import reference_model_path

    return str(reference_model_path("mixtral-ref"))


def geometric_mean_ppl(metrics: dict[str, float]) -> float | None:
    """exp(mean(log ppl)) over every `ppl/...` metric: one number in which no domain dominates."""
    from .eval.report import geometric_mean

    return geometric_mean(v for k, v in metrics.items() if k.startswith("ppl/"))


def run_demo(out: Path = Path("out/demo"), methods=DEFAULT_METHODS, ratio: float = 0.5, quiet: bool = False,
             samples: int = 64, seq_len: int = 256) -> dict:
    """Compress the reference model with each of `methods` into `out/<method>`, evaluate all, print one
    table; returns `{model label: metrics}` (also written to `out/demo.json`)."""
    from .api import compress
    from .eval import evaluate
    from .progress import layer_progress
    from .record import strict_json
    from .resources import builtin_domains

    t0 = time.perf_counter()
    model_path = _reference_model()
    console.print(f"[bold]moepress demo[/]: {', '.join(methods)} at ratio {ratio} on the trained reference model "
                  f"{model_path}")
    settings = dict(seq_len=seq_len, ppl=builtin_domains(), tasks=["next_chunk", "domain_mc"], mc_per_domain=16,
                    progress=False if quiet else None)  # --quiet: no bars inside evaluation either
    console.print("evaluating the original model on held-out text ...")
    rows = {"original": evaluate(model_path, **settings).metrics}
    paths = {}
    for method in methods:
        with layer_progress(quiet, method) as progress:
            result = compress(model_path, method, ratio, samples=samples, seq_len=seq_len, progress=progress,
                              out=Path(out) / method, overwrite=True)
        paths[method] = result.save()
        rows[LABELS.get(method, method)] = evaluate(str(paths[method]), **settings).metrics
    for metrics in rows.values():
        metrics["ppl/geo-mean"] = geometric_mean_ppl(metrics)
    console.print(demo_table(rows, ratio))
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "demo.json").write_text(strict_json({"ratio": ratio, "settings": settings, "models": rows}))
    console.print(f"checkpoints: [bold]{Path(out)}/<method>[/] (each loads with moepress.load or "
                  f"AutoModelForCausalLM.from_pretrained); the numbers: {Path(out) / 'demo.json'}")
    if "compressed_experts" in methods:
        console.print(f"compressed_experts is shown fitted, before any training: `moepress finetune "
                      f"{paths['compressed_experts']}` distills it from the original (optional)")
    console.print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return rows


def _retained(metric: str, value, original) -> str:
    from .eval.report import retained_percent

    kept = retained_percent(metric, value, original)
    return "–" if kept is None else f"{kept:.1f}"


def _millions(count: float) -> str:
    return f"{count / 1e6:.2f}M"


def demo_table(rows: dict[str, dict], ratio: float):
    """One row per model: parameters, then quality with the share of the original kept."""
    from rich import box
    from rich.table import Table

    table = Table(title=f"moepress demo: the reference model compressed at ratio {ratio}", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, padding=0,
                  caption=("↓ lower is better, ↑ higher is better. retained % = how much of the original's quality "
                           "is kept (original/compressed for perplexity, compressed/original for next-chunk "
                           "accuracy); 100 = nothing lost. geo-mean ppl = geometric mean of the held-out domains' "
                           "perplexities. * fitted mini-experts, not fine-tuned."))
    # headers broken into lines by hand: the table's natural width (74 columns with the longest
    # label, compressed_experts*) fits an 80-column terminal, so rich never folds a header mid-word
    columns = ("model", "params", "active\n/ token", "geo mean\nppl ↓", "retained\n%", "next\nchunk\nacc ↑",
               "domain\nacc ↑", "retained\n%")
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=True)
    original = rows["original"]
    acc = "next_chunk/acc"
    for label, m in rows.items():
        table.add_row(label, _millions(m["params/total"]), _millions(m["params/active_per_token"]),
                      f"{m['ppl/geo-mean']:.2f}", _retained("ppl", m["ppl/geo-mean"], original["ppl/geo-mean"]),
                      f"{m[acc]:.3f}", f"{m['domain_mc/acc']:.3f}", _retained(acc, m[acc], original[acc]))
    return table
