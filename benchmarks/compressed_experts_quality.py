"""Compressed Experts on a trained top-4 reference model: quality at equal fine-tuning budget, and speed.

    .venv/bin/python benchmarks/compressed_experts_quality.py [--steps 60] [--k-main 2]

Variants (every fine-tuned one gets the same budget: --steps x --batch x --seq-len tokens of the
reference model's own training split, next-token loss, cosine schedule):
  top-k            the original model, no fine-tuning
  top-k FT         the original model, fine-tuned (the paper's "Top-k SFT" oracle)
  top-kmain        top-`k_main` routing with the original weights, no fine-tuning
  top-kmain FT     the same, fine-tuned without vectors (`--train model`; the paper's "Top-k/2 SFT")
  CE vectors FT    top-`k_main` + compressed experts, only the vectors trained (`--train vectors`)
  CE FT            top-`k_main` + compressed experts, everything trained (`--train all`; the paper's recipe)
Held-out: perplexity and next-token accuracy on windows of the zoo's held-out split.
Speed: prefill and decode tokens/s (eager expert loops everywhere, so implementations match).

Model: `moepress.zoo.reference_model_path("olmoe-ref")` when built; otherwise a shorter run of the
same OLMoE recipe (16 experts, top-4, --pretrain-steps steps of 16 x 128 tokens) is trained once
into the moepress cache (`olmoe-ce-bench`), because olmoe-ref was still training.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import numpy as np
import torch
import transformers

from moepress.arch import moe_layer_views, parameter_counts, set_moe_block
from moepress.methods.compressed_experts.finetune import FinetuneConfig, finetune
from moepress.modeling.moepress_compressed import CompressedExpertsBlock


def reference_model(pretrain_steps: int) -> tuple[torch.nn.Module, object]:
    from moepress import zoo
    from moepress.zoo.paths import models_dir, tokenizer_dir
    from moepress.zoo.recipes import get_recipe
    from moepress.zoo.train import token_streams, train_model

    try:
        path = zoo.reference_model_path("olmoe-ref")
    except (FileNotFoundError, ValueError):
        path = models_dir() / "olmoe-ce-bench"
        if not (path / "model.safetensors").exists():
            tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir()))
            recipe = dataclasses.replace(get_recipe("olmoe-ref"), name="olmoe-ce-bench", steps=pretrain_steps,
                                         seq_len=128, warmup=30)
            train_model(recipe, path, token_streams("train", tok), tokenizer=tok, checkpoint_every=100)
            final = path.with_name(path.name + ".final")
            if final.exists() and not path.exists():
                final.rename(path)
    print(f"model: {path}")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                              experts_implementation="eager").eval()
    return model, path


def windows(streams: dict[str, np.ndarray], seq_len: int, per_domain: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    rows = []
    for name in sorted(streams):
        s = streams[name]
        if len(s) <= seq_len + 1:
            continue
        for start in rng.integers(0, len(s) - seq_len, per_domain):
            rows.append(s[start: start + seq_len].astype(np.int64))
    return torch.from_numpy(np.stack(rows))


@torch.no_grad()
def heldout_quality(model, ids: torch.Tensor, batch: int = 8) -> tuple[float, float]:
    nll = correct = count = 0.0
    for i in range(0, ids.shape[0], batch):
        x = ids[i: i + batch]
        logits = model(input_ids=x).logits[:, :-1].float()
        target = x[:, 1:]
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").item()
        correct += (logits.argmax(-1) == target).sum().item()
        count += target.numel()
    return float(np.exp(nll / count)), correct / count


def with_compressed_experts(model, k_main: int):
    model = copy.deepcopy(model)
    for view in moe_layer_views(model):
        set_moe_block(model, view.layer_index, CompressedExpertsBlock(view.block, model.config, k_main=k_main))
    return model


@torch.no_grad()
def speed(model, vocab: int, prefill_len: int = 256, decode_batch: int = 8, decode_tokens: int = 32, reps: int = 3):
    """(prefill tokens/s at batch 1, decode tokens/s at `decode_batch`), best of `reps`."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(2, vocab, (1, prefill_len), generator=g)
    short = torch.randint(2, vocab, (decode_batch, 32), generator=g)
    best_p = best_d = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        model(input_ids=prompt)
        best_p = min(best_p, time.perf_counter() - t)
        t = time.perf_counter()
        model.generate(short, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, do_sample=False,
                       pad_token_id=0)
        best_d = min(best_d, time.perf_counter() - t)
    return prefill_len / best_p, decode_batch * decode_tokens / best_d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--k-main", type=int, default=2)
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("--heldout-per-domain", type=int, default=24)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from moepress.zoo.train import token_streams

    base, path = reference_model(args.pretrain_steps)
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    k = base.config.num_experts_per_tok
    train_ids = windows(token_streams("train", tok), args.seq_len, 512, seed=1)
    held_ids = windows(token_streams("heldout", tok), args.seq_len, args.heldout_per_domain, seed=2)
    print(f"top-k={k}, k_main={args.k_main}; fine-tuning budget {args.steps} steps x {args.batch} x {args.seq_len} "
          f"tokens; held-out {held_ids.shape[0]} windows x {args.seq_len}")

    def tuned(model, train, lr):
        cfg = FinetuneConfig(steps=args.steps, batch_size=args.batch, lr=lr, train=train, seed=0)
        r = finetune(model, train_ids, cfg, progress=False)
        return model, f"{r.seconds:.0f}s, loss {np.mean(r.losses[:5]):.3f}->{np.mean(r.losses[-5:]):.3f}"

    variants = [
        ("top-k", lambda: (copy.deepcopy(base), "-")),
        ("top-k FT", lambda: tuned(with_compressed_experts(base, k), "model", 3e-4)),
        ("top-kmain", lambda: (with_compressed_experts(base, args.k_main), "-")),
        ("top-kmain FT", lambda: tuned(with_compressed_experts(base, args.k_main), "model", 3e-4)),
        ("CE vectors FT", lambda: tuned(with_compressed_experts(base, args.k_main), "vectors", 1e-2)),
        ("CE FT", lambda: tuned(with_compressed_experts(base, args.k_main), "all", 3e-4)),
    ]
    rows = []
    for name, build in variants:
        model, note = build()
        model.eval()
        ppl, acc = heldout_quality(model, held_ids)
        active = parameter_counts(model)["active_per_token"]
        rows.append((name, ppl, acc, active, note))
        print(f"{name:14s} ppl {ppl:8.3f}  acc {acc:.4f}  active/token {active:,}  ({note})", flush=True)
    ref_ppl, ref_acc = rows[1][1], rows[1][2]
    low_ppl, low_acc = rows[3][1], rows[3][2]
    ce_ppl, ce_acc = rows[5][1], rows[5][2]
    print(f"gap recovered by CE (vs top-k FT / top-kmain FT): ppl {(low_ppl - ce_ppl) / (low_ppl - ref_ppl):.1%}, "
          f"acc {(ce_acc - low_acc) / (ref_acc - low_acc):.1%}")
    print(f"active parameters: {rows[0][3]:,} -> {rows[5][3]:,} ({rows[5][3] / rows[0][3] - 1:+.1%}); "
          f"routed-expert compute per token -{1 - args.k_main / k:.0%}")

    vocab = base.config.vocab_size
    stock_main = copy.deepcopy(base)
    stock_main.config.num_experts_per_tok = args.k_main
    for layer in stock_main.model.layers:
        layer.mlp.gate.top_k = args.k_main
    timed = [("stock top-k", base), ("stock top-kmain", stock_main),
             ("CE block k_main=k", with_compressed_experts(base, k)),
             ("CE block k_main", rows and with_compressed_experts(base, args.k_main))]
    for name, model in timed:
        p, d = speed(model, vocab)
        print(f"{name:18s} prefill {p:8.0f} tok/s   decode {d:7.1f} tok/s", flush=True)


if __name__ == "__main__":
    main()
