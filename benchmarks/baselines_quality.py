"""The papers' baselines (MoE-Pruner, MoE-I², HC-SMoE variants) beside REAP, frequency and D²-MoE.

    PYTHONPATH=src .venv/bin/python benchmarks/baselines_quality.py [--model mixtral-ref] [--ratios 0.25,0.5]
        [--methods moe_pruner,moe_pruner:pattern=2:4,moe_i2,reap,frequency,d2moe]

Every method gets the same `--ratio` (fraction of routed-expert parameters removed) and the same
calibration tokens, so the rows store matched routed-expert parameters: pruning/merging keep
round(N·(1 − ratio)) experts, MoE-I² and D²-MoE spend the same budget on experts + low-rank
factors, MoE-Pruner keeps every expert and zeroes weights (its `stored` column counts non-zeros;
dense storage is unchanged without a sparse format). A method may carry options after a colon,
`name:opt=value;opt=value` (e.g. `hcsmoe:kmeans_seed=1`, `hcsmoe:cluster=hierarchical;metric=cosine`).
Printed per row: stored routed parameters, held-out perplexity (geometric mean over the zoo's
held-out domains, the first --eval-chars characters of each), next-chunk multiple-choice accuracy
and compression seconds; --verbose adds HC-SMoE cluster sizes and MoE-I² expert counts per layer.
`--quick`: ratio 0.5, the default rows (2:4 included) and HC-SMoE, --verbose, on a tiny random Mixtral, 4 x 64 calibration
tokens, 1000 characters of each held-out text (a smoke run: plumbing, not quality).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from _common import evaluate, heldout_files, print_provenance, quick, quick_model  # the merging table's evaluation

import moepress
from moepress.methods import available_methods
from moepress.zoo import reference_model_path

DEFAULT_METHODS = "moe_pruner,moe_pruner:pattern=2:4,moe_i2,reap,frequency,d2moe"


def parse_method(spec: str) -> tuple[str, dict]:
    """`name:opt=value;opt=value` -> (name, options); values are int/float/bool when they parse."""
    name, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, rest.split(";")):
        key, _, value = item.partition("=")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                pass
        options[key] = {"true": True, "false": False}.get(value, value) if isinstance(value, str) else value
    return name, options


def stored_routed(result, evaluated: dict) -> int:
    """Stored routed parameters: non-zeros where the method records them (MoE-Pruner), else all."""
    nonzero = [r["routed_nonzero"] for r in result.records.values() if "routed_nonzero" in r]
    return sum(nonzero) if nonzero else evaluated["routed"]


def layer_summary(result) -> str:
    parts = []
    for i, r in sorted(result.records.items()):
        if "cluster_sizes" in r:
            parts.append(f"L{i}:{sorted(r['cluster_sizes'], reverse=True)}")
        elif "ranks" in r and "kept" in r:
            parts.append(f"L{i}:{r['experts']}e r{min(r['ranks'])}-{max(r['ranks'])}")
    return " ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mixtral-ref")
    parser.add_argument("--path", default=None, help="a local model directory instead of a zoo model")
    parser.add_argument("--ratios", default="0.25,0.5")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated name[:opt=value;...]")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--mc-per-domain", type=int, default=16)
    parser.add_argument("--eval-chars", type=int, default=20000, help="characters of each held-out text (0 = all)")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny random model, calibration and evaluation (smoke run)")
    args = parser.parse_args()
    print_provenance()
    quick(parser, args, ratios="0.5", methods=DEFAULT_METHODS + ",hcsmoe", samples=4, seq_len=64, eval_seq_len=64,
          mc_per_domain=1, eval_chars=1000, verbose=True)
    if args.quick and args.path is None:
        args.model, args.path = "tiny random mixtral", str(quick_model())
    args.heldout = heldout_files(args.eval_chars)
    torch.set_num_threads(1)

    import transformers

    path = args.path or reference_model_path(args.model)
    original = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    base = evaluate(original, tokenizer, args)
    known = available_methods()
    print(f"model {args.model} ({path}); calibration {args.samples} x {args.seq_len} tokens")
    print(f"{'ratio':>5} {'method':>34} {'stored routed':>14} {'ppl(geo)':>9} {'acc':>6} {'compress s':>10}")
    print(f"{0:>5.2f} {'original':>34} {base['routed']:>14,} {base['ppl']:>9.3f} {base['acc']:>6.3f}")
    for ratio in (float(r) for r in args.ratios.split(",")):
        for spec in args.methods.split(","):
            name, options = parse_method(spec)
            if name not in known:
                print(f"{ratio:>5.2f} {spec:>34} not registered")
                continue
            if name == "moe_pruner" and "pattern" in options and options["pattern"] != "unstructured":
                n, m = (int(v) for v in str(options["pattern"]).split(":"))
                if abs((m - n) / m - ratio) > 1e-9:
                    continue  # an N:M pattern fixes its own sparsity
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = moepress.compress(str(path), name, ratio, samples=args.samples, seq_len=args.seq_len,
                                               seed=0, offload=False, **options)  # evaluated in memory
            except Exception as exc:  # one failing method must not hide the others
                print(f"{ratio:>5.2f} {spec:>34} FAILED: {type(exc).__name__}: {exc}")
                continue
            seconds = time.perf_counter() - t0
            res = evaluate(result.model, result.tokenizer, args)
            print(f"{ratio:>5.2f} {spec:>34} {stored_routed(result, res):>14,} {res['ppl']:>9.3f} {res['acc']:>6.3f} "
                  f"{seconds:>10.1f}", flush=True)
            if args.verbose:
                print("        " + layer_summary(result))


if __name__ == "__main__":
    main()
