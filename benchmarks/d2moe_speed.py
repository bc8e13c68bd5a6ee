"""Prefill and decode tokens/s of a D²-MoE model against the original (target: at most 10% slower).

    .venv/bin/python benchmarks/d2moe_speed.py [--model mixtral-ref] [--ratio 0.4] [--device cpu]

The original runs with transformers' default experts implementation; the D²-MoE model runs the
delta block (base once per token, low-rank deltas per expert). Variants: the default (10% base
pruning, half static / half dynamic) and no base pruning. Measured with
`moepress.eval.measure.throughput` (best of --repeats after a warm-up). `--quick`: a tiny random
Mixtral, 4 calibration sequences, prompt 16, 4 new tokens, one repeat (a smoke run).
"""

from __future__ import annotations

import argparse

import torch
import transformers
from _common import print_provenance, quick, quick_model

import moepress
from moepress.arch import parameter_counts
from moepress.eval.measure import throughput
from moepress.zoo import reference_model_path


def measure(model, vocab: int, args) -> dict:
    model.to(args.device)
    out = throughput(model, vocab, prompt_len=args.prompt_len, batch_size=args.batch_size,
                     new_tokens=args.new_tokens, repeats=args.repeats)
    model.to("cpu")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mixtral-ref")
    parser.add_argument("--path", default=None, help="a local model directory instead of a zoo model")
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids contention on a shared CPU)")
    parser.add_argument("--quick", action="store_true", help="tiny random model and sizes (smoke run)")
    args = parser.parse_args()
    print_provenance()
    quick(parser, args, samples=4, prompt_len=16, new_tokens=4, repeats=1)
    if args.quick and args.path is None:
        args.model, args.path = "tiny random mixtral", str(quick_model())
    torch.set_num_threads(args.threads)

    path = args.path or reference_model_path(args.model)
    vocab = len(transformers.AutoTokenizer.from_pretrained(str(path)))
    original = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    rows = [("original", original)]
    for label, prune in (("d2moe", 0.1), ("d2moe pp=0", 0.0)):
        result = moepress.compress(str(path), "d2moe", args.ratio, samples=args.samples, seq_len=256, base_prune=prune,
                                   offload=False)  # measured in memory (offloaded layers would stay on disk)
        rows.append((f"{label} {args.ratio:.0%}", result.model))
    print(f"model {args.path or args.model}; device {args.device}; threads {torch.get_num_threads()}; batch {args.batch_size}; "
          f"prompt {args.prompt_len}; decode {args.new_tokens} tokens; best of {args.repeats}")
    print(f"{'variant':>16} {'routed params':>14} {'prefill tok/s':>14} {'decode tok/s':>13} {'prefill %':>10} {'decode %':>9}")
    ref = None
    for label, model in rows:
        speed = measure(model, vocab, args)
        ref = ref or speed
        print(f"{label:>16} {parameter_counts(model)['routed_experts']:>14,} {speed['prefill_tok_s']:>14.1f} "
              f"{speed['decode_tok_s']:>13.1f} {100 * speed['prefill_tok_s'] / ref['prefill_tok_s']:>9.1f}% "
              f"{100 * speed['decode_tok_s'] / ref['decode_tok_s']:>8.1f}%")


if __name__ == "__main__":
    main()
