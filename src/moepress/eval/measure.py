"""Prefill/decode throughput (parameter counts are `moepress.arch.parameter_counts`)."""

from __future__ import annotations

import time

import torch


@torch.no_grad()
def throughput(model, vocab_size: int, prompt_len: int = 256, batch_size: int = 1, new_tokens: int = 32,
               repeats: int = 3, seed: int = 0) -> dict:
    """Prefill tokens/s (one forward of ``batch_size x prompt_len``) and greedy decode tokens/s.

    Best of ``repeats`` runs after one warm-up; random prompt ids (content does not change the
    cost of a dense-per-token forward, only routing, which random ids exercise as well).
    """
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = torch.randint(2, vocab_size, (batch_size, prompt_len), generator=gen).to(device)
    was_training = model.training
    model.eval()
    model(input_ids=ids[:, :16])  # warm-up
    prefill = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        prefill.append(time.perf_counter() - t0)
    decode = []
    for _ in range(repeats):
        out = model(input_ids=ids, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode.append(time.perf_counter() - t0)
    model.train(was_training)
    return {
        "prefill_tok_s": batch_size * prompt_len / min(prefill),
        "decode_tok_s": batch_size * new_tokens / min(decode),
        "prompt_len": prompt_len,
        "batch_size": batch_size,
        "new_tokens": new_tokens,
        "threads": torch.get_num_threads(),
    }
