"""`moepress demo` / `make demo`: the whole job on built-in defaults, in a few minutes on a laptop CPU.

Compress the committed reference model with a default method at ratio 0.5, evaluate before and
after on the built-in held-out texts and multiple-choice task, print the side-by-side table and
where the checkpoint went.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

console = Console()


def _reference_model() -> tuple[str, bool]:
    """(path of the built-in reference model, True if trained)."""
    from .zoo import reference_model_path

    return str(reference_model_path("mixtral-ref")), True


def run_demo(out: Path = Path("out/demo"), method: str = "reap", ratio: float = 0.5, quiet: bool = False,
             samples: int = 64, seq_len: int = 256) -> dict:
    from .api import compress
    from .eval import evaluate
    from .progress import layer_progress
    from .resources import builtin_domains

    t0 = time.perf_counter()
    model_path, _ = _reference_model()
    console.print(f"[bold]moepress demo[/]: {method} at ratio {ratio} on the trained reference model {model_path}")
    with layer_progress(quiet, f"{method}") as progress:
        result = compress(model_path, method, ratio, samples=samples, seq_len=seq_len, progress=progress,
                          out=out, overwrite=True)
    path = result.save()
    console.print("evaluating the original and the compressed model on held-out text ...")
    report = evaluate(str(path), baseline=model_path, seq_len=seq_len, ppl=builtin_domains(),
                      tasks=["next_chunk", "domain_mc"], speed=True, mc_per_domain=16)
    console.print(report.table())
    report.save_json(path / "eval.json")
    console.print(f"checkpoint: [bold]{path}[/]  (loads with moepress.load or AutoModelForCausalLM.from_pretrained)")
    console.print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return report.to_dict()
