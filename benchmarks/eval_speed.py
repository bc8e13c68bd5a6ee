"""Seconds of the local multiple-choice tasks: shared-context rows against one row per request.

    .venv/bin/python benchmarks/eval_speed.py [--model mixtral-ref] [--dtype auto] [--tasks next_chunk,domain_mc]

Scores every task's requests (4 choices per item) with `moepress.eval.loglikelihood.loglikelihoods`
twice: one right-padded row per request (the layout `moepress eval` used before shared contexts:
each choice re-runs its context), then the default (the 4 choices of an item in one row behind a
4-D mask, left-padded, logits kept from the first predicting position on). Prints, per task and
layout: seconds, forwards, padded tokens through the model, acc and acc_norm, and the largest
relative difference of the summed log-probabilities from the per-request layout (float rounding
only: batches of other shapes). `--dtype` (default float32; `auto` = the checkpoint's own, float16
for mixtral-ref, whose half matmuls are several times slower on a CPU). `--quick`: a tiny random
Mixtral with mixtral-ref's tokenizer, 2 items per domain (plumbing, not speed).
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import print_provenance, quick, quick_model

from moepress.eval.local_tasks import build_items
from moepress.eval.loglikelihood import encode_requests, loglikelihoods
from moepress.loading import load_pretrained
from moepress.resources import builtin_texts
from moepress.zoo import reference_model_path


def accuracies(scores: torch.Tensor, items: list[dict]) -> tuple[float, float]:
    """acc and acc_norm (per byte) as `local_tasks.score_items` computes them."""
    scores = scores.view(len(items), 4)
    n_bytes = torch.tensor([[len(c.encode("utf-8")) for c in item["choices"]] for item in items], dtype=torch.float64)
    labels = torch.tensor([item["label"] for item in items])
    return ((scores.argmax(1) == labels).double().mean().item(),
            ((scores / n_bytes.clamp(min=1)).argmax(1) == labels).double().mean().item())


def timed(model, encoded, args, shared: bool, pad_side: str) -> dict:
    forwards, tokens = [], []

    def count(module, inputs, kwargs):
        forwards.append(1)
        tokens.append(kwargs["input_ids"].numel())

    hook = model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        t0 = time.perf_counter()
        scores = loglikelihoods(model, encoded, max_len=args.seq_len, batch_size=args.batch_size, shared=shared,
                                pad_side=pad_side)
        seconds = time.perf_counter() - t0
    finally:
        hook.remove()
    return {"scores": scores, "seconds": seconds, "forwards": len(forwards), "tokens": sum(tokens)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mixtral-ref")
    parser.add_argument("--path", default=None, help="a local model directory instead of a zoo model")
    parser.add_argument("--dtype", default="float32", help="float32 | float16 | bfloat16 | auto (the checkpoint's own)")
    parser.add_argument("--tasks", default="next_chunk,domain_mc")
    parser.add_argument("--per-domain", type=int, default=32, help="items per domain (moepress eval's default)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny random model, 2 items per domain (smoke run)")
    args = parser.parse_args()
    print_provenance()
    quick(parser, args, per_domain=2)
    if args.quick and args.path is None:
        args.model, args.path = "tiny random mixtral", str(quick_model())
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_pretrained(args.path or str(reference_model_path(args.model)), dtype=args.dtype)
    dtype = next(model.parameters()).dtype
    print(f"model {args.model}; {str(dtype).removeprefix('torch.')}; threads {torch.get_num_threads()}; "
          f"seq_len {args.seq_len}; batch {args.batch_size}; {args.per_domain} items per domain")
    print(f"{'task':<11} {'layout':<12} {'seconds':>8} {'forwards':>9} {'tokens':>9} {'acc':>7} {'acc_norm':>9} "
          f"{'max rel diff':>13} {'speed-up':>9}")
    texts = builtin_texts()
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        items = build_items(task, texts, per_domain=args.per_domain)
        pairs = [(item["query"], choice) for item in items for choice in item["choices"]]
        encoded = encode_requests(tokenizer, pairs, args.seq_len)
        base = None
        for label, shared, pad_side in (("per-request", False, "right"), ("shared", None, "left")):
            run = timed(model, encoded, args, shared, pad_side)
            base = base or run
            acc, acc_norm = accuracies(run["scores"], items)
            diff = ((run["scores"] - base["scores"]).abs() / base["scores"].abs().clamp(min=1e-12)).max().item()
            print(f"{task:<11} {label:<12} {run['seconds']:>8.2f} {run['forwards']:>9} {run['tokens']:>9,} {acc:>7.4f} "
                  f"{acc_norm:>9.4f} {diff:>13.1e} {base['seconds'] / run['seconds']:>8.2f}x", flush=True)


if __name__ == "__main__":
    main()
