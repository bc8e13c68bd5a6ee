"""Expert merging vs pruning on the trained reference models (docs/algorithms.md: mergemoe, hcsmoe,
msmoe, zipit, reap).

    .venv/bin/python benchmarks/merging_quality.py [--model mixtral-ref] [--ratios 0.25,0.5]
        [--calib-domain linux] [--methods naee,mergemoe,...] [--json out.json]

For each ratio every method keeps M = round(N·(1 − ratio)) experts per MoE layer, calibrated on
--samples × --seq-len tokens identical for all methods: the zoo's built-in multi-domain calibration
text, or with --calib-domain the calibration split of ONE corpus domain (`moepress zoo corpus`
builds it) — the out-of-domain case: calibrate on one kind of text, deploy on all. Printed per row:
stored routed-expert parameters, held-out perplexity on each of the zoo's six held-out domains
(the first --eval-chars characters of each) and their geometric mean, next-chunk multiple-choice
accuracy (4 options, chance 0.25), the mean relative error of the MoE-layer outputs on the
calibration tokens (merging methods record it), and compression time.

Rows are registry names, optionally `+variant` (ROWS below gives the options of each variant):
`mergemoe+stock` is MergeMoE exported as the family's stock block with a fitted M-row router;
`mergemoe+routed`, `+layer`, `+robust` are the fitting options documented in methods/mergemoe;
`prune_refit` is the merge + prune hybrid (methods/prune_refit).

`--quick`: the default rows (or --methods) at ratio 0.5 on a tiny random Mixtral (`_common.quick_model`), 4 x 64
calibration tokens, 1000 characters of each held-out text (a smoke run: plumbing, not quality).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
from _common import domain_calibration, evaluate, heldout_files, print_provenance, quick, quick_model

import moepress
from moepress.methods import available_methods
from moepress.zoo import builtin_domains, reference_model_path

ROBUST = {"target": "routed", "solver": "ridge", "ridge": 0.1, "prior": "average", "similarity": "output"}
ROWS = {
    "frequency": {}, "reap": {}, "naee": {}, "average": {}, "zipit": {}, "msmoe": {}, "hcsmoe": {},
    "mergemoe": {}, "mergemoe+stock": {"export": "stock"},
    "mergemoe+routed": {"target": "routed"},
    "mergemoe+layer": {"target": "layer"},
    "mergemoe+robust": ROBUST,
    "prune_refit": {}, "prune_refit+frequency": {"select": "frequency"}, "prune_refit+reap": {"select": "reap"},
    "prune_refit+reap+ridge1": {"select": "reap", "ridge": 1.0},
    "mergemoe+routed+ridge": {"target": "routed", "solver": "ridge", "ridge": 0.1, "prior": "average"},
    "mergemoe+routed+ridge1": {"target": "routed", "solver": "ridge", "ridge": 1.0, "prior": "average"},
}
DEFAULT_ROWS = ("frequency", "reap", "naee", "average", "zipit", "msmoe", "hcsmoe", "mergemoe", "mergemoe+stock")


def run(row: str, path, kept: int, args):
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = moepress.compress(str(path), row.split("+")[0], experts=kept, samples=args.samples,
                                   seq_len=args.seq_len, seed=0, calib=args.calib, offload=False,  # evaluated in memory
                                   **ROWS.get(row, {}))
    seconds = time.perf_counter() - t0
    errors = [r["calib_rel_error"] for r in result.records.values() if "calib_rel_error" in r]
    res = evaluate(result.model, result.tokenizer, args)
    res["layer_err"] = sum(errors) / len(errors) if errors else float("nan")
    res["seconds"] = seconds
    return res


def print_row(ratio, kept, name, res, domains) -> None:
    err = f"{res['layer_err']:>9.4f}" if "layer_err" in res else " " * 9
    secs = f"{res['seconds']:>8.1f}" if "seconds" in res else " " * 8
    print(f"{ratio:>5.2f} {kept:>3} {name:>22} {res['routed']:>12,} {res['ppl']:>9.3f} "
          + " ".join(f"{res['per_domain'][d]:>8.2f}" for d in domains)
          + f" {res['acc']:>6.3f} {err} {secs}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mixtral-ref")
    parser.add_argument("--path", default=None, help="a local model directory instead of a zoo model")
    parser.add_argument("--ratios", default="0.25,0.5")
    parser.add_argument("--methods", default=",".join(DEFAULT_ROWS), help=f"rows: {', '.join(ROWS)}")
    parser.add_argument("--calib-domain", default=None,
                        help="calibrate on this one corpus domain's calibration split (default: built-in multi-domain text)")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--mc-per-domain", type=int, default=32)
    parser.add_argument("--eval-chars", type=int, default=20000, help="characters of each held-out text (0 = all)")
    parser.add_argument("--json", default=None, help="also write every row to this JSON file")
    parser.add_argument("--quick", action="store_true", help="tiny random model, calibration and evaluation (smoke run)")
    args = parser.parse_args()
    print_provenance()
    quick(parser, args, ratios="0.5", samples=4, seq_len=64, eval_seq_len=64, mc_per_domain=1, eval_chars=1000)
    if args.quick and args.path is None:
        args.model, args.path = "tiny random mixtral", str(quick_model())
    args.heldout = heldout_files(args.eval_chars)
    args.calib = domain_calibration(args.calib_domain)
    domains = builtin_domains()

    import transformers

    path = args.path or reference_model_path(args.model)
    original = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    cfg = original.config
    n = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) or cfg.n_routed_experts
    base = evaluate(original, tokenizer, args)
    known = available_methods()
    wanted = args.methods.split(",")
    rows = [m for m in wanted if m.split("+")[0] in known]  # in the order asked
    missing = [m for m in wanted if m.split("+")[0] not in known]
    print(f"model {args.model} ({path}); {n} experts/layer, top-{cfg.num_experts_per_tok}; calibration "
          f"{args.calib_domain or 'built-in multi-domain'}, {args.samples} x {args.seq_len} tokens; "
          f"threads {torch.get_num_threads()}" + (f"; not registered (skipped): {missing}" if missing else ""))
    print(f"{'ratio':>5} {'M':>3} {'method':>22} {'routed':>12} {'ppl(geo)':>9} "
          + " ".join(f"{d[:8]:>8}" for d in domains) + f" {'acc':>6} {'layer err':>9} {'secs':>8}")
    print_row(0.0, n, "original", base, domains)
    table = {"model": args.model, "calib": args.calib_domain or "multi-domain", "samples": args.samples,
             "seq_len": args.seq_len, "eval_chars": args.eval_chars, "rows": [{"ratio": 0.0, "method": "original", **base}]}
    for ratio in (float(r) for r in args.ratios.split(",")):
        kept = max(int(cfg.num_experts_per_tok), round(n * (1 - ratio)))
        for row in rows:
            try:
                res = run(row, path, kept, args)
            except Exception as exc:  # one failing method must not hide the others
                print(f"{ratio:>5.2f} {kept:>3} {row:>22} FAILED: {type(exc).__name__}: {exc}", flush=True)
                continue
            print_row(ratio, kept, row, res, domains)
            table["rows"].append({"ratio": ratio, "experts": kept, "method": row, **res})
            if args.json:
                Path(args.json).write_text(json.dumps(table, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
