"""Compressed Experts' auxiliary mini-experts without any training: quality against active parameters.

    .venv/bin/python benchmarks/compressed_experts_aux_sweep.py [--model olmoe-wide] [--k-main 1,2,4]
        [--widths 0,2,4,8,16,32] [--samples 64] [--plot aux_sweep.png] [--json out.json]

For each split k_main + (k - k_main) and each width R, `moepress.compress(..., "compressed_experts",
k_main=K, aux_width=R)` fits the mini-experts on --samples x 256 tokens of the built-in calibration
text (the vectors stay at one: no fine-tuning anywhere here), and the held-out perplexity of the
zoo's six domains (the windows of `compressed_experts_quality.py`) is printed beside the active
parameters per token. The stock model routed to top-1 ... top-k is the frontier to beat: a point
below that curve is a better use of the same compute than more full experts. Printed per row:
"recovered" = share of the stock top-k_main -> top-k perplexity gap closed. `--plot` draws both.
`--quick`: a tiny random Mixtral (top-2), k_main 1, widths 0 and 2, 4 x 32 calibration tokens, held-out
windows of the shipped texts (the built corpus is not needed); a smoke run: plumbing, not quality.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import (builtin_streams, heldout_quality, load_reference, print_provenance, quick, quick_model, stock_top,
                     windows, with_fitted_auxiliary)

from moepress.arch import parameter_counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="olmoe-wide")
    ap.add_argument("--k-main", type=lambda v: [int(k) for k in v.split(",")], default=[1, 2, 4])
    ap.add_argument("--widths", type=lambda v: [int(w) for w in v.split(",")], default=[0, 2, 4, 8, 16, 32])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--heldout-per-domain", type=int, default=24)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny random model and sizes (smoke run)")
    args = ap.parse_args()
    print_provenance()
    quick(ap, args, k_main=[1], widths=[0, 2], samples=4, seq_len=32, heldout_per_domain=2)
    from moepress.zoo.train import token_streams

    base, tok, path = load_reference(str(quick_model()) if args.quick else args.model)
    k = base.config.num_experts_per_tok
    streams = builtin_streams(tok, "heldout") if args.quick else token_streams("heldout", tok)
    held = windows(streams, args.seq_len, args.heldout_per_domain, seed=2)
    print(f"model {path}: top-{k}; held-out {held.shape[0]} windows; mini-experts fitted on "
          f"{args.samples} x {args.seq_len} calibration tokens, no fine-tuning", flush=True)
    stock = {}
    for top in range(1, k + 1):
        model = stock_top(base, top)
        stock[top] = (heldout_quality(model.eval(), held)[0], parameter_counts(model)["active_per_token"])
        print(f"stock top-{top:<2d}          ppl {stock[top][0]:8.3f}  active/token {stock[top][1]:,}", flush=True)
    rows = []
    for km in args.k_main:
        low, top = stock[km][0], stock[k][0]
        for width in args.widths:
            model = with_fitted_auxiliary(path, km, width, args.samples, args.seq_len)
            ppl = heldout_quality(model, held)[0]
            active = parameter_counts(model)["active_per_token"]
            rows.append({"k_main": km, "width": width, "ppl": ppl, "active_per_token": active,
                         "recovered": (low - ppl) / (low - top)})
            print(f"CE {km}+{k - km} aux width {width:<3d} ppl {ppl:8.3f}  active/token {active:,}  "
                  f"recovered {rows[-1]['recovered']:.1%}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(path), "top_k": k, "stock": stock, "ce_aux": rows}, indent=1))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        ax.plot([a / 1e6 for _, a in stock.values()], [p for p, _ in stock.values()], "k-o", label="stock top-k'")
        for top, (p, a) in stock.items():
            ax.annotate(f"top-{top}", (a / 1e6, p), textcoords="offset points", xytext=(4, 4), fontsize=8)
        for km in args.k_main:
            pts = [r for r in rows if r["k_main"] == km]
            ax.plot([r["active_per_token"] / 1e6 for r in pts], [r["ppl"] for r in pts], "o--",
                    label=f"CE {km}+{k - km}, aux width {', '.join(str(r['width']) for r in pts)}")
        ax.set_xlabel("active parameters per token (M)")
        ax.set_ylabel("held-out perplexity (6 domains)")
        ax.set_title(f"{args.model}: fitted mini-experts vs more full experts (no fine-tuning)", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
