"""Wall time and peak memory of every registered method on one model, in one run (issue 22 §3).

    PYTHONPATH=src .venv/bin/python benchmarks/compress_time.py [--model mixtral-ref | PATH | synthetic-qwen3]
        [--methods reap,moe_i2,...] [--ratio 0.5] [--samples 128] [--seq-len 256] [--threads 2] [--json F]

Each method runs `moepress.compress(MODEL, METHOD, ratio, samples=, seq_len=, seed=0,
stats_cache=False)` (the API defaults otherwise: streamed where the method allows it) in its own
child process, one after the other, so that each peak is that method's alone: the child's
`VmHWM` (peak resident set, including the touched pages of the memory-mapped checkpoint) read at
its exit, and the wall time of the `compress` call alone (imports and the save are not counted).
No statistics cache, so every method computes its statistics from scratch.

`--model synthetic-qwen3`: a random Qwen3-MoE with the shape of the issue's held-out model and of
the zoo's qwen3-ref (hidden 256, 4 layers, 16 experts of width 192, top-4; `moepress.testing.tiny_model`'s
random weights) written to a temp directory: the timing of every stage is that of the real shape even though the
weights are not trained. `--quick`: a tiny random Mixtral, 4 x 32 calibration tokens, reap and d2moe
(a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, print_provenance, quick, quick_model

CHILD = r"""
import json, sys, time
import torch
import moepress
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec.pop("threads"))
path, method, ratio = spec.pop("path"), spec.pop("method"), spec.pop("ratio")
start = time.perf_counter()
result = moepress.compress(path, method, ratio, seed=0, stats_cache=False, **spec)
seconds = time.perf_counter() - start
fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
print("RESULT " + json.dumps({"seconds": seconds, "peak_kib": int(fields["VmHWM"].split()[0])}))
"""

QWEN3_SHAPE = dict(hidden_size=256, moe_intermediate_size=192, intermediate_size=768, num_experts=16,
                   num_experts_per_tok=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64)


def synthetic_qwen3(folder: Path, layers: int = 4) -> Path:
    """A random Qwen3-MoE of `QWEN3_SHAPE` with mixtral-ref's tokenizer, saved under `folder`."""
    import transformers

    from moepress.testing import tiny_model
    from moepress.zoo import reference_model_path

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(reference_model_path("mixtral-ref")))
    model = tiny_model("qwen3_moe", num_layers=layers, vocab_size=len(tokenizer), **QWEN3_SHAPE,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    path = folder / "synthetic-qwen3"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_method(path: str, method: str, args) -> dict:
    spec = {"path": path, "method": method, "ratio": args.ratio, "samples": args.samples, "seq_len": args.seq_len,
            "threads": args.threads}
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]}
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> None:
    from moepress.methods import available_methods

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mixtral-ref", help="zoo name, model directory or synthetic-qwen3")
    parser.add_argument("--methods", default=None, help="comma list (default: every registered method)")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each child")
    parser.add_argument("--quick", action="store_true", help="tiny random Mixtral, 4 x 32 tokens, reap and d2moe")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    args = parser.parse_args(argv)
    print_provenance(argv)
    quick(parser, args, argv, samples=4, seq_len=32, methods="reap,d2moe")
    methods = args.methods.split(",") if args.methods else list(available_methods())
    unknown = sorted(set(methods) - set(available_methods()))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; registered: {', '.join(available_methods())}")

    with tempfile.TemporaryDirectory(prefix="moepress-compress-time-") as tmp:
        if args.quick and args.model == "mixtral-ref":
            path, label = quick_model(), "tiny random mixtral"
        elif args.model == "synthetic-qwen3":
            path, label = synthetic_qwen3(Path(tmp)), "synthetic-qwen3 (random, qwen3-ref shape)"
        else:
            from moepress.zoo import REFERENCE_MODELS, reference_model_path

            path = reference_model_path(args.model) if args.model in REFERENCE_MODELS else Path(args.model)
            label = args.model
        print(f"model {label}; ratio {args.ratio}; calibration {args.samples} x {args.seq_len} tokens; "
              f"{args.threads} threads per run; no statistics cache")
        print(f"{'method':<20} {'seconds':>9} {'x reap':>7} {'x d2moe':>8} {'peak RSS GiB':>13}")
        rows = {}
        for method in methods:
            start = time.perf_counter()
            rows[method] = run_method(str(path), method, args)
            rows[method]["child_seconds"] = time.perf_counter() - start
        for method, row in rows.items():
            if "error" in row:
                print(f"{method:<20} failed: {row['error']}")
                continue
            rel = {ref: (f"{row['seconds'] / rows[ref]['seconds']:.2f}" if "seconds" in rows.get(ref, {}) else "-")
                   for ref in ("reap", "d2moe")}
            print(f"{method:<20} {row['seconds']:>9.2f} {rel['reap']:>7} {rel['d2moe']:>8} "
                  f"{row['peak_kib'] / 2**20:>13.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": label, "args": vars(args), "rows": rows}, indent=1))
    if any("error" in row for row in rows.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
