"""Expert merging vs pruning on the trained reference models (ALGORITHMS.md §1.5, §4.1–4.4).

    .venv/bin/python benchmarks/merging_quality.py [--model mixtral-ref] [--ratios 0.25,0.5]

For each ratio every method keeps M = round(N·(1 − ratio)) experts per MoE layer, calibrated on the
zoo's built-in calibration text (--samples × --seq-len tokens, identical for all methods). Printed per
row: stored routed-expert parameters, held-out perplexity (geometric mean over the zoo's held-out
domains, the first --eval-chars characters of each), next-chunk multiple-choice accuracy (4 options, chance 0.25), the mean relative error of
the MoE-layer outputs on the calibration tokens (merging methods record it), and compression time.
`mergemoe+stock` is MergeMoE exported as the family's stock block with a fitted M-row router:
the row beside `mergemoe` is what stock-loadability costs.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch

import moepress
from moepress.arch import parameter_counts
from moepress.methods import available_methods
from moepress.zoo import builtin_domains, builtin_text, reference_model_path

ROWS = (("frequency", {}), ("reap", {}), ("average", {}), ("zipit", {}), ("msmoe", {}), ("hcsmoe", {}),
        ("mergemoe", {}), ("mergemoe+stock", {"export": "stock"}))


def heldout_files(chars: int) -> list[str]:
    """The zoo's held-out texts, each cut to its first `chars` characters (0 = whole), as temp files."""
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp(prefix="moepress-heldout-"))
    paths = []
    for domain in builtin_domains():
        text = builtin_text(f"heldout:{domain}")
        path = folder / f"{domain}.txt"
        path.write_text(text[:chars] if chars else text)
        paths.append(str(path))
    return paths


def evaluate(model, tokenizer, args) -> dict:
    report = moepress.evaluate(model, tokenizer=tokenizer, ppl=args.heldout,
                               tasks=["next_chunk"], seq_len=args.eval_seq_len, mc_per_domain=args.mc_per_domain)
    ppl = {k.split("/", 1)[1]: v for k, v in report.metrics.items() if k.startswith("ppl/")}
    return {"ppl": math.exp(sum(math.log(v) for v in ppl.values()) / len(ppl)), "per_domain": ppl,
            "acc": report.metrics["next_chunk/acc"], "routed": parameter_counts(model)["routed_experts"]}


def run(method: str, path, kept: int, args, options: dict):
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = moepress.compress(str(path), method.split("+")[0], experts=kept, samples=args.samples,
                                   seq_len=args.seq_len, seed=0, offload=False, **options)  # evaluated in memory
    seconds = time.perf_counter() - t0
    errors = [r["calib_rel_error"] for r in result.records.values() if "calib_rel_error" in r]
    res = evaluate(result.model, result.tokenizer, args)
    res["layer_err"] = sum(errors) / len(errors) if errors else float("nan")
    return res, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mixtral-ref")
    parser.add_argument("--path", default=None, help="a local model directory instead of a zoo model")
    parser.add_argument("--ratios", default="0.25,0.5")
    parser.add_argument("--methods", default=",".join(r[0] for r in ROWS))
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--mc-per-domain", type=int, default=32)
    parser.add_argument("--eval-chars", type=int, default=20000, help="characters of each held-out text (0 = all)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    args.heldout = heldout_files(args.eval_chars)

    import transformers

    path = args.path or reference_model_path(args.model)
    original = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    cfg = original.config
    n = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) or cfg.n_routed_experts
    base = evaluate(original, tokenizer, args)
    known = available_methods()
    wanted = args.methods.split(",")
    options = dict(ROWS)
    rows = [(m, options.get(m, {})) for m in wanted if m.split("+")[0] in known]  # in the order asked
    missing = [m for m in wanted if m.split("+")[0] not in known]
    print(f"model {args.model} ({path}); {n} experts/layer, top-{cfg.num_experts_per_tok}; calibration "
          f"{args.samples} x {args.seq_len} tokens; threads {torch.get_num_threads()}"
          + (f"; not registered (skipped): {missing}" if missing else ""))
    print(f"{'ratio':>5} {'M':>3} {'method':>15} {'routed params':>14} {'ppl(geo)':>9} {'acc':>6} "
          f"{'layer err':>9} {'compress s':>10}")
    print(f"{0:>5.2f} {n:>3} {'original':>15} {base['routed']:>14,} {base['ppl']:>9.3f} {base['acc']:>6.3f}")
    for ratio in (float(r) for r in args.ratios.split(",")):
        kept = max(int(cfg.num_experts_per_tok), round(n * (1 - ratio)))
        for method, options in rows:
            try:
                res, seconds = run(method, path, kept, args, options)
            except Exception as exc:  # one failing method must not hide the others
                print(f"{ratio:>5.2f} {kept:>3} {method:>15} FAILED: {type(exc).__name__}: {exc}")
                continue
            print(f"{ratio:>5.2f} {kept:>3} {method:>15} {res['routed']:>14,} {res['ppl']:>9.3f} {res['acc']:>6.3f} "
                  f"{res['layer_err']:>9.4f} {seconds:>10.1f}", flush=True)
            if args.verbose:
                print("        " + ", ".join(f"{d}={v:.2f}" for d, v in res["per_domain"].items()))


if __name__ == "__main__":
    main()
