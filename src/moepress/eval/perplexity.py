"""Perplexity with a fixed window and stride, and the unigram baseline on the same tokens."""

from __future__ import annotations

import math
from collections import Counter

import torch


def encode_text(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one id stream (no special tokens), shape ``[N]``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def scoring_windows(num_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows ``(begin, end, first_scored)``: every token after the first is scored once.

    A window spans ``[begin, end)``; tokens at positions ``>= first_scored`` are scored, the
    earlier ones are context only. With ``stride < seq_len`` consecutive windows overlap by
    ``seq_len - stride`` context tokens; with ``stride == seq_len`` they overlap by one token,
    so that the first token of a window is still predicted from the one before it.
    """
    if stride < 1 or stride > seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    windows = []
    scored_until = 1  # position 0 has no context and is never scored
    begin = 0
    while scored_until < num_tokens:
        end = min(begin + seq_len, num_tokens)
        windows.append((begin, end, scored_until))
        scored_until = end
        if end == num_tokens:
            break
        begin = max(0, end - (seq_len - stride)) if stride < seq_len else end - 1
    return windows


@torch.no_grad()
def token_nll(model, ids: torch.Tensor, seq_len: int = 256, stride: int | None = None, batch_size: int = 8):
    """Negative log-likelihood (nats) of every scored token of ``ids``.

    Returns ``(nll [M], targets [M])`` in text order; ``M = len(ids) - 1``.
    """
    stride = stride or seq_len
    windows = scoring_windows(len(ids), seq_len, stride)
    device = next(model.parameters()).device
    nlls, targets = [], []
    was_training = model.training
    model.eval()
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        width = max(end - begin for begin, end, _ in chunk)
        batch = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, (begin, end, _) in enumerate(chunk):
            batch[row, : end - begin] = ids[begin:end]
            mask[row, : end - begin] = 1
        logits = model(input_ids=batch.to(device), attention_mask=mask.to(device)).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1).cpu()
        for row, (begin, end, first) in enumerate(chunk):
            # position p of the window predicts token p+1
            pos = torch.arange(first - begin - 1, end - begin - 1)
            tgt = ids[first:end]
            nlls.append(-logprobs[row, pos, tgt])
            targets.append(tgt)
    model.train(was_training)
    if not nlls:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(nlls).double(), torch.cat(targets)


def perplexity(model, tokenizer, text: str, seq_len: int = 256, stride: int | None = None, batch_size: int = 8) -> dict:
    """Perplexity of ``text`` under ``model`` with windows of ``seq_len`` tokens moved by ``stride``.

    Returns ``{"ppl", "nll_per_token", "tokens", "bits_per_byte", "seq_len", "stride",
    "unigram_ppl"}``; ``unigram_ppl`` is the perplexity of a unigram model fitted on the scored
    tokens themselves: an optimistic (oracle) bound no unigram model can beat on this text.
    """
    ids = encode_text(tokenizer, text)
    if len(ids) < 2:
        raise ValueError("text too short for perplexity: it encodes to fewer than 2 tokens")
    nll, targets = token_nll(model, ids, seq_len=seq_len, stride=stride, batch_size=batch_size)
    mean = float(nll.mean())
    n_bytes = len(text.encode("utf-8"))
    return {
        "ppl": math.exp(mean),
        "nll_per_token": mean,
        "tokens": int(len(targets)),
        "bits_per_byte": float(nll.sum()) / math.log(2) / max(n_bytes, 1),
        "seq_len": seq_len,
        "stride": stride or seq_len,
        "unigram_ppl": unigram_perplexity(targets.tolist()),
    }


def unigram_perplexity(tokens: list[int]) -> float:
    """``exp(entropy)`` of the empirical token distribution (the oracle unigram on these tokens)."""
    counts = Counter(tokens)
    total = sum(counts.values())
    entropy = -sum(c / total * math.log(c / total) for c in counts.values())
    return math.exp(entropy)
