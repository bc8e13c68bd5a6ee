"""Batched log-likelihood of continuations given contexts (lm-eval's ``loglikelihood`` request).

A request ``(context, continuation)`` is scored as the summed log-probability of the
continuation's tokens, each predicted from the context and the continuation tokens before it;
the context keeps its last ``max_len - len(continuation)`` tokens (the continuation at most
``max_len - 1``), so a request never spans more than ``max_len`` positions.

How the forwards are laid out (the result is the same up to float rounding, tested against one
unpadded forward per request):

- **shared context** (the choices of a multiple-choice item): one row ``[context, choice_1, ...,
  choice_m]``; a 4-D attention mask lets each choice see the context and itself only, and its
  position ids continue the context's, so each choice is computed exactly as after the context
  alone, while the context is run once instead of ``m`` times. Used when the model's attention
  takes such a mask (``eager``/``sdpa``) and no sliding window shorter than ``max_len`` applies;
  otherwise every request is its own row with a 2-D padding mask (the model builds its own mask).
- rows are sorted by length and batched under ``batch_size`` rows and ``batch_size * max_len``
  tokens (the memory of the plain layout); rows are left-padded with explicit position ids, so the
  model's logits are kept only from the first predicting position on (``logits_to_keep``);
- the log-probabilities are gathered for all scored tokens of a batch at once
  (``logit[target] - logsumexp(logits)`` over those positions only) and summed per request.
"""

from __future__ import annotations

import inspect

import torch


def encode_requests(tokenizer, pairs: list[tuple[str, str]], max_len: int) -> list[tuple[list[int], list[int]]]:
    """``[(context ids, continuation ids)]``, truncated as the module docstring says.

    Every distinct string is tokenized once (the choices of an item share their context)."""
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2 (one context + one continuation token), got {max_len}")
    ids = _encode_unique(tokenizer, [text for pair in pairs for text in pair])
    encoded = []
    for context, continuation in pairs:
        cont = ids[continuation][: max_len - 1]
        ctx = ids[context][-(max_len - len(cont)):]
        if not ctx:
            raise ValueError(f"empty context for continuation {continuation[:40]!r}: a continuation's first token "
                             "needs at least one context token to be predicted from")
        encoded.append((ctx, cont))
    return encoded


def _encode_unique(tokenizer, texts: list[str]) -> dict[str, list[int]]:
    unique = list(dict.fromkeys(texts))
    return dict(zip(unique, tokenizer(unique, add_special_tokens=False)["input_ids"])) if unique else {}


def shares_context(model, max_len: int) -> bool:
    """Whether requests with one context may share a row (see the module docstring): the attention
    takes a 4-D mask, and no sliding window (or other local attention) shorter than ``max_len`` applies."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "_attn_implementation", None) not in ("eager", "sdpa"):
        return False
    if getattr(config, "attention_chunk_size", None):
        return False
    window = getattr(config, "sliding_window", None) or None
    local_ok = window is None or window >= max_len
    layer_types = getattr(config, "layer_types", None)
    if layer_types:  # per-layer kinds: the window only applies where a layer says so
        return all(kind == "full_attention" or (kind == "sliding_attention" and local_ok) for kind in layer_types)
    return local_ok


@torch.no_grad()
def loglikelihoods(model, encoded: list[tuple[list[int], list[int]]], max_len: int = 256, batch_size: int = 8,
                   shared: bool | None = None, pad_side: str = "left", progress=None) -> torch.Tensor:
    """Summed log-probability (float64 ``[R]``) of each encoded request ``(context ids, continuation ids)``.

    Args:
        shared: share one row between requests with the same context; None = ``shares_context``.
        pad_side: "left" (logits kept from the first predicting position on) or "right".
        progress: ``advance(n, total)`` after each forward (``n`` more requests done of ``total``).
    """
    if pad_side not in ("left", "right"):
        raise ValueError(f"pad_side must be 'left' or 'right', got {pad_side!r}")
    if shared is None:
        shared = shares_context(model, max_len)
    rows = _rows(encoded, shared, budget=batch_size * max_len)
    lengths = [len(ctx) + sum(len(encoded[r][1]) for r in requests) for ctx, requests in rows]
    scores = torch.zeros(len(encoded), dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for batch in _batches(lengths, batch_size, batch_size * max_len):
            _score_batch(model, [rows[b] for b in batch], encoded, shared, pad_side == "left", scores)
            if progress is not None:
                progress(sum(len(rows[b][1]) for b in batch), len(encoded))
    finally:
        model.train(was_training)
    return scores


def _rows(encoded, shared: bool, budget: int) -> list[tuple[list[int], list[int]]]:
    """``[(context ids, [request index, ...])]``: requests with an identical context share a row
    (while it stays within ``budget`` tokens) when ``shared``, else one row each."""
    if not shared:
        return [(ctx, [r]) for r, (ctx, _) in enumerate(encoded)]
    groups: dict[tuple[int, ...], list[int]] = {}
    for r, (ctx, _) in enumerate(encoded):
        groups.setdefault(tuple(ctx), []).append(r)
    rows = []
    for ctx, requests in groups.items():
        current, length = [], len(ctx)
        for r in requests:
            if current and length + len(encoded[r][1]) > budget:
                rows.append((list(ctx), current))
                current, length = [], len(ctx)
            current.append(r)
            length += len(encoded[r][1])
        rows.append((list(ctx), current))
    return rows


def _batches(lengths: list[int], batch_size: int, budget: int):
    """Row indices, longest first, in batches of at most ``batch_size`` rows and ``budget`` padded tokens."""
    order = sorted(range(len(lengths)), key=lambda r: -lengths[r])
    batch, width = [], 0
    for r in order:
        if batch and (len(batch) >= batch_size or (len(batch) + 1) * width > budget):
            yield batch
            batch, width = [], 0
        batch.append(r)
        width = max(width, lengths[r])
    if batch:
        yield batch


def _score_batch(model, rows, encoded, shared: bool, left: bool, scores: torch.Tensor) -> None:
    """One forward over ``rows``; adds each request's summed log-probability into ``scores``."""
    device = next(model.parameters()).device
    layout = _layout(rows, encoded, left)
    width = layout["segment"].shape[1]
    if shared:
        mask = _shared_context_mask(layout["segment"], _activation_dtype(model))
    else:
        mask = (layout["segment"] >= 0).long()
    # flat index of every scored token: request, its position in the row (the one predicting it), target
    lengths = layout["cont_len"]
    request = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    step = torch.arange(int(lengths.sum())) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    position = torch.where(step == 0, layout["first_pred"][request], layout["cont_start"][request] + step - 1)
    row = layout["row"][request]
    target = layout["targets"]
    kwargs = {}
    first = int(position.min()) if len(position) else width - 1
    if left and accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = width - first  # only the positions from the first predicting one on
    else:
        first = 0
    logits = model(input_ids=layout["input_ids"].to(device), attention_mask=mask.to(device),
                   position_ids=layout["position_ids"].to(device), use_cache=False, **kwargs).logits
    picked = logits[row.to(device), (position - first).to(device)].float()  # [N, vocab]
    token_logprob = picked.gather(1, target.to(device)[:, None])[:, 0] - torch.logsumexp(picked, dim=-1)
    scores.index_add_(0, layout["request_ids"][request], token_logprob.double().cpu())


def _layout(rows, encoded, left: bool) -> dict:
    """Padded row tensors of a batch and per-request offsets.

    ``segment`` is -1 on padding, 0 on context tokens, j on the j-th continuation of the row;
    ``first_pred`` the position whose logits predict a request's first token (the context's last);
    ``cont_start`` where its tokens sit (later tokens are predicted from the one before)."""
    lengths = [len(ctx) + sum(len(encoded[r][1]) for r in requests) for ctx, requests in rows]
    width = max(lengths)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    position_ids = torch.zeros(len(rows), width, dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)
    request_ids, row_of, first_pred, cont_start, cont_len, targets = [], [], [], [], [], []
    for b, ((ctx, requests), length) in enumerate(zip(rows, lengths)):
        offset = width - length if left else 0
        conts = [encoded[r][1] for r in requests]
        tokens = torch.tensor(ctx + [t for cont in conts for t in cont], dtype=torch.long)
        input_ids[b, offset : offset + length] = tokens
        sizes = torch.tensor([len(ctx)] + [len(c) for c in conts])
        segment[b, offset : offset + length] = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
        starts = torch.cumsum(sizes, 0) - sizes  # each segment's start in the row
        # context positions 0..len(ctx)-1; every continuation goes on from len(ctx)
        within = torch.arange(length) - torch.repeat_interleave(starts, sizes)
        position_ids[b, offset : offset + length] = within + torch.repeat_interleave((starts > 0) * len(ctx), sizes)
        request_ids += requests
        row_of += [b] * len(requests)
        first_pred += [offset + len(ctx) - 1] * len(requests)
        cont_start += (offset + starts[1:]).tolist()
        cont_len += sizes[1:].tolist()
        targets += [t for cont in conts for t in cont]
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return {"input_ids": input_ids, "position_ids": position_ids, "segment": segment, "row": as_long(row_of),
            "request_ids": as_long(request_ids), "first_pred": as_long(first_pred), "cont_start": as_long(cont_start),
            "cont_len": as_long(cont_len), "targets": as_long(targets)}


def _shared_context_mask(segment: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4-D mask ``[B, 1, W, W]``: a token sees the earlier tokens of its own segment and the
    context (segment 0), never padding; a padding position sees itself only (no empty softmax row)."""
    width = segment.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    query, key = segment[:, :, None], segment[:, None, :]
    allowed = causal & (key >= 0) & ((key == 0) | (key == query))
    allowed |= torch.eye(width, dtype=torch.bool)
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def _activation_dtype(model) -> torch.dtype:
    """The dtype of the hidden states (that of the input embeddings), which a float mask must match."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is not None and weight.is_floating_point():
        return weight.dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def accepts_logits_to_keep(model) -> bool:
    """Whether ``model.forward`` takes ``logits_to_keep`` (transformers' causal LMs: logits of the last N only)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
