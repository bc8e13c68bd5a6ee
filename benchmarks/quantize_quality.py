"""Quantization after compression: size on disk and held-out perplexity beside each single step.

    .venv/bin/python benchmarks/quantize_quality.py [--model mixtral-ref] [--ratio 0.5]
        [--methods reap,mergemoe] [--schemes int8,fp8] [--json out.json]

Rows: the original checkpoint; quantization alone (`moepress.quantize`, each scheme); for each
method, compression alone (`moepress.compress(..., ratio)`, saved) and compression + quantization
(`moepress.quantize` of that saved compressed checkpoint: the same `quantize_experts` call that
`compress(..., quantize=...)` makes after compressing, without compressing again; a test checks
the two give the same tensors). Every row is a checkpoint written in --dtype (float16 by default,
the dtype mixtral-ref's weights are stored in, so sizes compare like with like), reloaded with
`moepress.load` (float32 compute) and evaluated on the zoo's six held-out domains (geometric-mean
perplexity, `_common.evaluate`). Size = bytes of the checkpoint's safetensors files.
`--quick`: the same rows on a tiny random Mixtral, 4 x 64 calibration tokens, 1000 characters of
each held-out text, checkpoints in a temp dir removed at the end (a smoke run: plumbing, not quality).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch
from _common import evaluate, heldout_files, print_provenance, quick, quick_model

import moepress
from moepress.loading import load_tokenizer
from moepress.zoo import builtin_domains, reference_model_path


def size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors")) / 1e6


def measure(name: str, path: Path, args, seconds: float = float("nan")) -> dict:
    model = moepress.load(path)  # the reload under test: quantized checkpoints come back through auto_map code
    tokenizer = load_tokenizer(path)
    res = evaluate(model, tokenizer, args)
    res.update(name=name, size_mb=size_mb(path), seconds=seconds)
    return res


def print_row(res: dict, domains, base_ppl: float) -> None:
    print(f"{res['name']:>24} {res['size_mb']:>8.3f} {res['routed']:>10,} {res['ppl']:>9.3f} "
          f"{res['ppl'] / base_ppl - 1:>+7.1%} " + " ".join(f"{res['per_domain'][d]:>8.2f}" for d in domains)
          + f" {res['acc']:>6.3f} {res['seconds']:>7.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mixtral-ref")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--methods", default="reap,mergemoe")
    parser.add_argument("--schemes", default="int8,fp8")
    parser.add_argument("--dtype", default="float16", help="dtype of every written checkpoint")
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
    args.heldout = heldout_files(args.eval_chars)
    domains = builtin_domains()
    schemes = [s for s in args.schemes.split(",") if s]
    if args.quick:
        args.model = "tiny random mixtral"
    source = quick_model() if args.quick else reference_model_path(args.model)
    work = Path(tempfile.mkdtemp(prefix="moepress-quant-bench-"))
    print(f"model {args.model} ({source}); checkpoints in {args.dtype}; ratio {args.ratio}; calibration "
          f"{args.samples} x {args.seq_len} tokens; threads {torch.get_num_threads()}")
    print(f"{'row':>24} {'size MB':>8} {'routed':>10} {'ppl(geo)':>9} {'vs orig':>7} "
          + " ".join(f"{d[:8]:>8}" for d in domains) + f" {'acc':>6} {'secs':>7}")
    rows = []

    def add(res):
        rows.append(res)
        print_row(res, domains, rows[0]["ppl"])
        if args.json:
            Path(args.json).write_text(json.dumps({"model": args.model, "ratio": args.ratio, "dtype": args.dtype,
                                                   "rows": rows}, indent=1, default=float) + "\n")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        add(measure("original", source, args))
        for scheme in schemes:
            t0 = time.perf_counter()
            path = moepress.quantize(str(source), scheme, out=work / f"orig-{scheme}", dtype=args.dtype)
            add(measure(f"{scheme} alone", path, args, time.perf_counter() - t0))
        for method in [m for m in args.methods.split(",") if m]:
            t0 = time.perf_counter()
            result = moepress.compress(str(source), method, args.ratio, samples=args.samples, seq_len=args.seq_len,
                                       seed=0, dtype=args.dtype, out=work / method)
            path = result.save()
            add(measure(f"{method} {args.ratio:g}", path, args, time.perf_counter() - t0))
            for scheme in schemes:
                t0 = time.perf_counter()
                qpath = moepress.quantize(str(path), scheme, out=work / f"{method}-{scheme}", dtype=args.dtype)
                add(measure(f"{method} {args.ratio:g} + {scheme}", qpath, args, time.perf_counter() - t0))
    if args.quick:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"checkpoints kept in {work}")


if __name__ == "__main__":
    main()
