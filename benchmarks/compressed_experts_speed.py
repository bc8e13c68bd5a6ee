"""Compressed Experts inference speed at real layer widths (random weights): CE vs stock top-k and top-k/2.

    PYTHONPATH=src .venv/bin/python benchmarks/compressed_experts_speed.py [--hidden 2048] [--intermediate 768]
        [--experts 64] [--top-k 8] [--k-main 4] [--aux-width 8,32] [--layers 2] [--reps 3]

A Qwen3-MoE model of the given width (vocab 4096, `--layers` decoder layers, random weights,
transformers' grouped expert kernel) is run three ways in one process, interleaved per repetition
(best of --reps): the stock block routing to top-k, the stock block routing to top-k/2, and
moepress's `CompressedExpertsBlock` with k/2 main experts + k/2 compressed vectors (the vectors'
values do not change the cost). Printed: prefill tokens/s (batch 4 x 256, no cache) and decode
tokens/s (batch 8, 32 new tokens, KV cache), and CE's speed-up over top-k. The reference models
(hidden 128) are too narrow for this: there the block's routing bookkeeping outweighs the experts
it saves (README). `--aux-width R[,R2..]` adds CE with width-R auxiliary mini-experts (the
`aux_width` option of the method) and `--k-main` sets the main experts (default k/2).
`--quick`: hidden 64, 8 experts of width 32, top-4, one layer, --aux-width 2, one repetition at
batch 2 x 32 (prefill) and 2 x 4 new tokens (decode): a smoke run.
"""

from __future__ import annotations

import argparse

import torch
import transformers
from _common import print_provenance, quick, speed, stock_top, with_compressed_experts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=768, help="expert width (moe_intermediate_size)")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--k-main", type=int, default=None, help="main experts of CE (default top-k / 2)")
    ap.add_argument("--aux-width", type=lambda v: [int(w) for w in v.split(",")], default=[])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repetition (smoke run)")
    args = ap.parse_args()
    print_provenance()
    quick(ap, args, hidden=64, intermediate=32, experts=8, top_k=4, aux_width=[2], layers=1, reps=1)
    h, k = args.hidden, args.top_k
    config = transformers.Qwen3MoeConfig(
        vocab_size=4096, hidden_size=h, num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
        head_dim=h // 8, intermediate_size=2 * h, moe_intermediate_size=args.intermediate, num_experts=args.experts,
        num_experts_per_tok=k, norm_topk_prob=True, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="grouped_mm").eval()
    km = args.k_main or k // 2
    ce = f"CE {km}+{k - km}"
    models = {f"stock top-{k}": model, f"stock top-{km}": stock_top(model, km), ce: with_compressed_experts(model, km)}
    for width in args.aux_width:
        models[f"{ce} aux{width}"] = with_compressed_experts(model, km, aux_width=width)
    print(f"hidden {h}, {args.experts} experts of width {args.intermediate}, top-{k}, {args.layers} layers; "
          f"threads {torch.get_num_threads()}")
    sizes = {"prefill": (2, 32), "decode": (2, 4)} if args.quick else {}
    figures = speed(models, config.vocab_size, args.reps, **sizes)
    for name, (prefill, decode) in figures.items():
        print(f"{name:>16}  prefill {prefill:9.0f} tok/s  decode {decode:8.1f} tok/s")
    base_p, base_d = figures[f"stock top-{k}"]
    for name in models:
        if name.startswith("CE"):
            p, d = figures[name]
            print(f"{name} vs top-{k}: prefill x{p / base_p:.2f}, decode x{d / base_d:.2f}")


if __name__ == "__main__":
    main()
