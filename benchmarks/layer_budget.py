"""Per-layer expert budgets: `--budget auto` against `uniform` at equal stored parameters (moepress/run/plan.py).

    .venv/bin/python benchmarks/layer_budget.py [--model mixtral-ref] [--ratio 0.5]
        [--methods frequency,reap,mergemoe] [--floor N] [--json out.json]

For each method, two runs on the same calibration tokens: `uniform` (every MoE layer keeps
M = round(N·(1 − ratio)) experts) and `auto` (the same total number of kept experts, hence the
same stored routed-expert parameters — printed — spread over the layers by the measured
sensitivity curves). Printed per row: the per-layer counts, stored routed-expert parameters,
held-out perplexity on the zoo's six held-out domains (the evaluation of
benchmarks/merging_quality.py) and their geometric mean, next-chunk accuracy, the mean relative
error of the layer outputs on the calibration tokens (merging methods record it), the predicted
objective Σ_i e_i(m_i) (sensitivity curves of the ORIGINAL model) and the seconds.
The auto row also prints each layer's sensitivity curve, so a loss of `auto` can be traced.
`--quick`: the same rows on a tiny random Mixtral, 4 x 64 calibration tokens, 1000 characters of
each held-out text (a smoke run: plumbing, not quality).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
from _common import evaluate, heldout_files, print_provenance, quick, quick_model

import moepress
from moepress.zoo import builtin_domains, reference_model_path


def run(path, method: str, budget: str, args) -> dict:
    t0 = time.perf_counter()
    name, _, variant = method.partition("+")
    options = {"export": "stock"} if variant == "stock" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = moepress.compress(str(path), name, args.ratio, samples=args.samples, seq_len=args.seq_len, seed=0,
                                   offload=False, budget=budget, budget_floor=args.floor if budget == "auto" else None,
                                   **options)
    seconds = time.perf_counter() - t0
    res = evaluate(result.model, result.tokenizer, args)
    errors = [r["calib_rel_error"] for r in result.records.values() if "calib_rel_error" in r]
    res.update(layer_err=sum(errors) / len(errors) if errors else float("nan"), seconds=seconds,
               budget=result.record["budget"], counts=result.record["parameters"]["after"]["experts_per_layer"])
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mixtral-ref")
    parser.add_argument("--path", default=None, help="a local model directory instead of a zoo model")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--methods", default="frequency,reap,mergemoe")
    parser.add_argument("--floor", type=int, default=None, help="--budget-floor (default max(top-k, ceil(N/4)))")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--mc-per-domain", type=int, default=32)
    parser.add_argument("--eval-chars", type=int, default=20000, help="characters of each held-out text (0 = all)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--quick", action="store_true", help="tiny random model, calibration and evaluation (smoke run)")
    args = parser.parse_args()
    print_provenance()
    quick(parser, args, samples=4, seq_len=64, eval_seq_len=64, mc_per_domain=1, eval_chars=1000)
    if args.quick and args.path is None:
        args.model, args.path = "tiny random mixtral", str(quick_model())
    args.heldout = heldout_files(args.eval_chars)
    domains = builtin_domains()
    path = args.path or reference_model_path(args.model)
    print(f"model {args.model} ({path}); ratio {args.ratio}; calibration built-in, {args.samples} x {args.seq_len} "
          f"tokens; floor {args.floor or 'default'}; threads {torch.get_num_threads()}", flush=True)
    print(f"{'method':>12} {'budget':>7} {'experts/layer':>16} {'routed':>11} {'gmean ppl':>9} "
          + " ".join(f"{d[:8]:>8}" for d in domains) + f" {'acc':>6} {'layer err':>9} {'pred':>8} {'s':>6}")
    rows = []
    for method in args.methods.split(","):
        for budget in ("uniform", "auto"):
            res = run(path, method, budget, args)
            counts = ",".join(str(res["counts"][k]) for k in sorted(res["counts"]))
            pred = res["budget"].get("predicted_error", {}).get(budget, float("nan"))
            print(f"{method:>12} {budget:>7} {counts:>16} {res['routed']:>11,} {res['ppl']:>9.3f} "
                  + " ".join(f"{res['per_domain'][d]:>8.2f}" for d in domains)
                  + f" {res['acc']:>6.3f} {res['layer_err']:>9.4f} {pred:>8.4f} {res['seconds']:>6.1f}", flush=True)
            if budget == "auto":
                print(f"{'':>12} predicted Σe: uniform {res['budget']['predicted_error']['uniform']:.4f} -> auto "
                      f"{res['budget']['predicted_error']['auto']:.4f}; curves e_i(m):")
                for layer, curve in res["budget"]["sensitivity"].items():
                    print(f"{'':>14} layer {layer}: " + " ".join(f"{m}:{e:.4f}" for m, e in curve.items()))
            rows.append({"method": method, "budget": budget, **{k: v for k, v in res.items()}})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
