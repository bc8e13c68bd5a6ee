"""D²-MoE against NAEE, REAP and MergeMoE at equal stored routed-expert parameters.

    .venv/bin/python benchmarks/d2moe_quality.py [--model mixtral-ref] [--ratios 0.2,0.4,0.6]

For each target ratio r the pruning/merging methods keep M = round(N·(1 − r)) experts per layer;
D²-MoE is then given the ratio those methods actually reach, 1 − M/N, so every row stores (at
most) the same routed-expert parameters. Held-out: perplexity on every held-out domain of the
zoo (geometric mean printed, per domain in --verbose) and the built-in next-chunk multiple-choice
accuracy. The paper (Table 2) reports D²-MoE ahead of NAEE at 40–60% on Mixtral-8x7B.

Model: `moepress.zoo.reference_model_path(name)` (trained reference MoE). Calibration: the zoo's
built-in calibration text, --samples sequences of --seq-len tokens, the same for every method.
`--quick`: ratio 0.4 on a tiny random Mixtral, 4 x 64 calibration tokens, evaluation windows of 64
tokens, 1000 characters of each held-out text (a smoke run: plumbing, not quality).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from _common import heldout_files, print_provenance, quick, quick_model

import moepress
from moepress.arch import parameter_counts
from moepress.methods import available_methods
from moepress.zoo import builtin_domains, reference_model_path

COMPETITORS = ("naee", "reap", "mergemoe")


def evaluate(model, tokenizer, args) -> dict:
    report = moepress.evaluate(model, tokenizer=tokenizer, ppl=args.heldout,
                               tasks=["next_chunk"], seq_len=args.eval_seq_len, mc_per_domain=args.mc_per_domain)
    ppl = {_domain(k.split("/", 1)[1]): v for k, v in report.metrics.items() if k.startswith("ppl/")}
    routed = parameter_counts(model)["routed_experts"]
    return {"ppl": math.exp(sum(math.log(v) for v in ppl.values()) / len(ppl)), "per_domain": ppl,
            "acc": report.metrics["next_chunk/acc"], "routed": routed}


def _domain(source: str) -> str:
    """`heldout:code` (a whole shipped text) or `/tmp/.../code.txt` (its first --eval-chars) -> `code`."""
    return source.split(":", 1)[1] if source.startswith("heldout:") else Path(source).stem


def run(method: str, path, args, **kwargs) -> tuple[dict, float]:
    t0 = time.perf_counter()
    result = moepress.compress(str(path), method, samples=args.samples, seq_len=args.seq_len, seed=0,
                               offload=False, **kwargs)  # evaluated in memory below
    seconds = time.perf_counter() - t0
    return evaluate(result.model, result.tokenizer, args), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mixtral-ref")
    parser.add_argument("--path", default=None, help="a local model directory instead of a zoo model")
    parser.add_argument("--ratios", default="0.2,0.4,0.6")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--mc-per-domain", type=int, default=32)
    parser.add_argument("--eval-chars", type=int, default=0, help="characters of each held-out text (0 = all)")
    parser.add_argument("--base-prune", type=float, default=0.1)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--methods", default="d2moe," + ",".join(COMPETITORS), help="comma-separated subset")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids contention on a shared CPU)")
    parser.add_argument("--quick", action="store_true", help="tiny random model, calibration and evaluation (smoke run)")
    args = parser.parse_args()
    print_provenance()
    quick(parser, args, ratios="0.4", samples=4, seq_len=64, eval_seq_len=64, mc_per_domain=1, eval_chars=1000,
          verbose=True)
    args.heldout = heldout_files(args.eval_chars) if args.eval_chars else [f"heldout:{d}" for d in builtin_domains()]
    if args.quick and args.path is None:
        args.model, args.path = "tiny random mixtral", str(quick_model())
    torch.set_num_threads(args.threads)

    path = args.path or reference_model_path(args.model)
    import transformers

    original = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    n = original.config.num_local_experts if hasattr(original.config, "num_local_experts") else None
    n = n or getattr(original.config, "num_experts", None) or original.config.n_routed_experts
    base = evaluate(original, tokenizer, args)
    known = available_methods()
    missing = [m for m in COMPETITORS if m not in known]
    print(f"model {args.path or args.model} ({path}); {n} experts/layer; calibration {args.samples} x {args.seq_len} tokens; "
          f"threads {torch.get_num_threads()}" + (f"; not registered (skipped): {missing}" if missing else ""))
    print(f"{'ratio':>6} {'method':>9} {'routed params':>14} {'ppl(geo)':>9} {'acc':>6} {'compress s':>10}")
    print(f"{0.0:>6.3f} {'original':>9} {base['routed']:>14,} {base['ppl']:>9.3f} {base['acc']:>6.3f} {'':>10}")
    for target in (float(r) for r in args.ratios.split(",")):
        kept = max(1, round(n * (1 - target)))
        ratio = 1 - kept / n
        chosen = args.methods.split(",")
        rows = [("d2moe", dict(ratio=ratio, base_prune=args.base_prune))] if "d2moe" in chosen else []
        rows += [(m, dict(experts=kept)) for m in COMPETITORS if m in known and m in chosen]
        for method, kwargs in rows:
            try:
                res, seconds = run(method, path, args, **kwargs)
            except Exception as exc:  # a failing competitor must not hide the others
                print(f"{ratio:>6.3f} {method:>9} FAILED: {type(exc).__name__}: {exc}")
                continue
            print(f"{ratio:>6.3f} {method:>9} {res['routed']:>14,} {res['ppl']:>9.3f} {res['acc']:>6.3f} {seconds:>10.1f}")
            if args.verbose:
                print("        " + ", ".join(f"{d}={v:.2f}" for d, v in res["per_domain"].items()))


if __name__ == "__main__":
    main()
