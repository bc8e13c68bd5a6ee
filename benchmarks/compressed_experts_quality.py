"""Compressed Experts on a trained top-k reference model: quality at an equal fine-tuning budget, and speed.

    .venv/bin/python benchmarks/compressed_experts_quality.py [--model olmoe-ref] [--sequences 256]
        [--epochs 2] [--lr 2e-5] [--vectors-lr 0.01] [--k-main 2] [--aux-width 4,8] [--matched]
        [--speed-only] [--json out.json]

Every fine-tuned variant gets the same recipe (`--recipe paper` of `moepress finetune`,
docs/algorithms.md#compressed_experts-fine-tuning: whole model, cosine schedule, warmup 0.03, --epochs
passes over the same --sequences packed
windows of the reference model's own training split, batch 8), as the paper's baselines do (Table 1):
  top-k            the original model, no fine-tuning
  top-k FT         the original model fine-tuned (the paper's "Top-k SFT" oracle)
  top-k/2          the stock model routed to k_main experts (num_experts_per_tok = k_main), no FT
  top-k/2 FT       the same, fine-tuned (the paper's "Top-k/2 SFT")
  CE FT            k_main main experts + compressed experts, fine-tuned with the vectors
With --aux-width R (our addition, `--opt aux_width=R` of the method; methods/compressed_experts):
  CE+auxR          CE whose auxiliary experts also run fitted width-R mini-experts (fitted on
                   --calib-samples x --seq-len tokens of the built-in calibration text), no FT
  CE+auxR FT       the same, fine-tuned alike (--aux-width 4,8 runs both widths)
With --matched: the stock model routed to k_main + 1 experts, without and with FT (active
parameters per token printed for every row): does the mini-experts' gain beat spending about the
same compute on one more full expert?
Reported: held-out perplexity and next-token accuracy on windows of the zoo's held-out split, and
gap recovered = (ppl(top-k/2 FT) - ppl(CE FT)) / (ppl(top-k/2 FT) - ppl(top-k FT)).
`--distill` (our addition, not the paper's recipe): every variant is fine-tuned to the original top-k
model's logits (KL) instead of the next token, the same frozen teacher for all.
`--vectors-lr` gives the compressed vectors their own peak lr (default: the recipe's, as the paper):
the paper's 2e-5 moves a vector that starts at 1 by ~1e-5 per step, so a run of a few hundred steps
leaves the vectors where they started; the option shows what the vectors can do in that budget.

Speed (same run, same process, best of --reps): prefill tokens/s (batch 4 x 256) and decode
tokens/s (batch 8, 32 new tokens, KV cache) for the stock top-k model, the stock top-k/2 model (both
with transformers' default grouped expert kernel) and the CE model.

`--quick`: a tiny random Mixtral (top-2: 1 main + 1 compressed), every variant (--aux-width 2,
--matched) on 8 windows of 32 tokens from the shipped texts (the built corpus is not needed), one
epoch, speed at batch 2 x 32 / 2 x 4 new tokens (a smoke run: plumbing, not quality).
"""

from __future__ import annotations

import argparse
import copy
import json

import numpy as np
import torch
from _common import (builtin_streams, heldout_quality, load_reference, print_provenance, quick, quick_model, speed,
                     stock_top, windows, with_compressed_experts, with_fitted_auxiliary)

from moepress.arch import parameter_counts
from moepress.methods.compressed_experts.finetune import FinetuneConfig, finetune


def fitted_auxiliary(args, width: int):
    """`with_fitted_auxiliary` for this run's model and k_main, fitted once per width (kept in `args.fitted`)."""
    if width not in args.fitted:
        args.fitted[width] = with_fitted_auxiliary(args.path, args.k_main, width, args.calib_samples, args.seq_len)
    return args.fitted[width]


def quality(base, args, k: int) -> list[dict]:
    from moepress.zoo.train import token_streams

    tok = args.tokenizer
    streams = (lambda split: builtin_streams(tok, split)) if args.quick else (lambda split: token_streams(split, tok))
    train_ids = windows(streams("train"), args.seq_len, args.sequences // 5 + 1, seed=1)[: args.sequences]
    held_ids = windows(streams("heldout"), args.seq_len, args.heldout_per_domain, seed=2)
    print(f"top-k={k}, k_main={args.k_main}; {'distilled, ' if args.distill else ''}recipe paper: {args.epochs} epochs x {train_ids.shape[0]} windows of "
          f"{args.seq_len} tokens, batch 8, lr {args.lr}, vectors lr {args.vectors_lr or args.lr}; "
          f"held-out {held_ids.shape[0]} windows", flush=True)

    def tuned(model):
        cfg = FinetuneConfig(recipe="paper", epochs=args.epochs, lr=args.lr, vectors_lr=args.vectors_lr, seed=0,
                             distill=args.distill)
        r = finetune(model, train_ids, cfg, progress=False, teacher=base if args.distill else None)
        return model, f"{r.steps} steps, {r.seconds:.0f}s, loss {np.mean(r.losses[:5]):.3f}->{np.mean(r.losses[-5:]):.3f}"

    variants = [
        ("top-k", lambda: (copy.deepcopy(base), "-")),
        ("top-k FT", lambda: tuned(copy.deepcopy(base))),
        ("top-k/2", lambda: (stock_top(base, args.k_main), "-")),
        ("top-k/2 FT", lambda: tuned(stock_top(base, args.k_main))),
        ("CE", lambda: (with_compressed_experts(base, args.k_main), "-")),
        ("CE FT", lambda: tuned(with_compressed_experts(base, args.k_main))),
    ]
    for width in args.aux_width:  # fitted once (args.fitted, shared with the speed runs); FT on a copy
        variants += [(f"CE+aux{width}", lambda width=width: (fitted_auxiliary(args, width), "fitted")),
                     (f"CE+aux{width} FT", lambda width=width: tuned(copy.deepcopy(fitted_auxiliary(args, width))))]
    if args.matched:
        variants += [(f"top-{args.k_main + 1}", lambda: (stock_top(base, args.k_main + 1), "-")),
                     (f"top-{args.k_main + 1} FT", lambda: tuned(stock_top(base, args.k_main + 1)))]
    rows = []
    for name, build in variants:
        model, note = build()
        ppl, acc = heldout_quality(model.eval(), held_ids)
        active = parameter_counts(model)["active_per_token"]
        rows.append({"variant": name, "ppl": ppl, "acc": acc, "active_per_token": active, "note": note})
        print(f"{name:12s} ppl {ppl:8.3f}  acc {acc:.4f}  active/token {active:,}  ({note})", flush=True)
    by = {r["variant"]: r for r in rows}
    top, low, ce = by["top-k FT"]["ppl"], by["top-k/2 FT"]["ppl"], by["CE FT"]["ppl"]
    print(f"gap top-k/2 FT vs top-k FT: {low / top - 1:+.1%} ppl; gap recovered by CE FT: {(low - ce) / (low - top):.1%}")
    for name in by:
        if name.startswith("CE+aux"):
            print(f"gap recovered by {name}: {(low - by[name]['ppl']) / (low - top):.1%}")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="olmoe-ref", help="zoo name or model directory")
    ap.add_argument("--sequences", type=int, default=256, help="packed training windows (same for every variant)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--vectors-lr", type=float, default=None)
    ap.add_argument("--k-main", type=int, default=None, help="main experts (default: top-k / 2)")
    ap.add_argument("--heldout-per-domain", type=int, default=24)
    ap.add_argument("--aux-width", type=lambda v: [int(w) for w in v.split(",")], default=[],
                    help="R[,R2..]: also run CE with fitted width-R auxiliary mini-experts")
    ap.add_argument("--calib-samples", type=int, default=64, help="calibration windows of the mini-experts' fit")
    ap.add_argument("--matched", action="store_true", help="also run the stock top-(k_main + 1) model")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--distill", action="store_true",
                    help="every variant learns the original top-k model's logits (KL) instead of the next token")
    ap.add_argument("--speed-only", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny random model, every variant, tiny sizes (smoke run)")
    args = ap.parse_args()
    print_provenance()
    quick(ap, args, sequences=8, seq_len=32, epochs=1.0, heldout_per_domain=2, aux_width=[2], calib_samples=4,
          matched=True, reps=1)
    base, args.tokenizer, path = load_reference(str(quick_model()) if args.quick else args.model)
    args.path, args.fitted = path, {}
    k = base.config.num_experts_per_tok
    args.k_main = args.k_main or k // 2
    print(f"model: {path}; threads {torch.get_num_threads()}")
    report = {"model": str(path), "top_k": k, "k_main": args.k_main}
    if not args.speed_only:
        report["quality"] = quality(base, args, k)
    timed = {"stock top-k": base, "stock top-k/2": stock_top(base, args.k_main),
             "CE": with_compressed_experts(base, args.k_main)}
    for width in args.aux_width:
        timed[f"CE+aux{width}"] = fitted_auxiliary(args, width)
    if args.matched:
        timed[f"stock top-{args.k_main + 1}"] = stock_top(base, args.k_main + 1)
    sizes = {"prefill": (2, 32), "decode": (2, 4)} if args.quick else {}
    report["speed"] = speed(timed, base.config.vocab_size, args.reps, **sizes)
    for name, (p, d) in report["speed"].items():
        print(f"{name:14s} prefill {p:9.0f} tok/s   decode {d:8.1f} tok/s", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
