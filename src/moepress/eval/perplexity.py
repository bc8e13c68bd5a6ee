"""Perplexity with a fixed window and stride, and the unigram baseline on the same tokens."""

from __future__ import annotations

import math
from collections import Counter

import torch

from .loglikelihood import accepts_logits_to_keep


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
def token_nll(model, ids: torch.Tensor, seq_len: int = 256, stride: int | None = None, batch_size: int = 8,
              progress=None):
    """Negative log-likelihood (nats) of every scored token of ``ids``.

    One forward per window, ``batch_size`` windows at a time (`_batch_nll`). ``progress``:
    ``advance(n, total)`` after each batch (``n`` more windows done of ``total``).
    Returns ``(nll [M], targets [M])`` in text order; ``M = len(ids) - 1``.
    """
    stride = stride or seq_len
    windows = scoring_windows(len(ids), seq_len, stride)
    keep_logits = accepts_logits_to_keep(model)
    nlls, targets = [], []
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(windows), batch_size):
            nll, tgt = _batch_nll(model, ids, torch.tensor(windows[i : i + batch_size], dtype=torch.long), keep_logits)
            nlls.append(nll)
            targets.append(tgt)
            if progress is not None:
                progress(min(batch_size, len(windows) - i), len(windows))
    finally:
        model.train(was_training)
    if not nlls:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(nlls).double(), torch.cat(targets)


def _batch_nll(model, ids: torch.Tensor, windows: torch.Tensor, keep_logits: bool):
    """``(nll, targets)`` of the scored tokens of ``windows`` (``[B, (begin, end, first)]``) in one forward.

    Left-padded, positions from 0 in every window; the scored tokens ``[first, end)`` of a window
    are its last ones, so the model's logits are kept for the last columns only (when it takes
    ``logits_to_keep``), and all of them are gathered at once: ``logsumexp(logits) - logit[target]``."""
    device = next(model.parameters()).device
    begin, end, first = windows.unbind(1)
    width = int((end - begin).max())
    pad = width - (end - begin)
    column = torch.arange(width)
    inside = column[None] >= pad[:, None]
    position = (column[None] - pad[:, None]).clamp(min=0)
    batch = torch.where(inside, ids[(begin[:, None] + position).clamp(max=len(ids) - 1)], 0)
    counts = end - first
    keep = int(counts.max()) + 1  # the scored columns and the one before them (it predicts the first)
    kwargs = {"logits_to_keep": keep} if keep_logits else {}
    logits = model(input_ids=batch.to(device), attention_mask=inside.long().to(device),
                   position_ids=position.to(device), use_cache=False, **kwargs).logits
    row = torch.repeat_interleave(torch.arange(len(windows)), counts)
    step = torch.arange(int(counts.sum())) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    column_of = width - 1 - counts[row] + step - (width - keep if keep_logits else 0)  # the column predicting it
    picked = logits[row.to(device), column_of.to(device)].float()
    targets = ids[first[row] + step]
    nll = torch.logsumexp(picked, dim=-1) - picked.gather(1, targets.to(device)[:, None])[:, 0]
    return nll.cpu(), targets


def perplexity(model, tokenizer, text: str, seq_len: int = 256, stride: int | None = None, batch_size: int = 8,
               progress=None) -> dict:
    """Perplexity of ``text`` under ``model`` with windows of ``seq_len`` tokens moved by ``stride``.

    Returns ``{"ppl", "nll_per_token", "tokens", "bits_per_byte", "seq_len", "stride",
    "unigram_ppl"}``; ``unigram_ppl`` is the perplexity of a unigram model fitted on the scored
    tokens themselves: an optimistic (oracle) bound no unigram model can beat on this text.
    ``progress``: ``advance(n, total)`` as the windows are scored.
    """
    ids = encode_text(tokenizer, text)
    if len(ids) < 2:
        raise ValueError("text too short for perplexity: it encodes to fewer than 2 tokens")
    nll, targets = token_nll(model, ids, seq_len=seq_len, stride=stride, batch_size=batch_size, progress=progress)
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
