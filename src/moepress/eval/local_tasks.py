"""Built-in multiple-choice tasks from the held-out texts, scored directly (no lm-eval).

- ``next_chunk`` (alias ``local_mc``): given a passage, pick its true continuation among 4;
  the 3 distractors are continuations from other places of the same domain.
- ``domain_mc``: the same, but the distractors come from 3 other domains, so the model must
  tell which domain the passage continues in.

Items are a pure function of the texts and the seed. Metrics: ``acc`` (argmax of the summed
log-probability of the continuation) and ``acc_norm`` (log-probability per byte).
"""

from __future__ import annotations

import random
import re

import torch

from .loglikelihood import encode_requests, loglikelihoods

LOCAL_TASKS = ("next_chunk", "domain_mc")
ALIASES = {"local_mc": "next_chunk"}

_BOUNDARY = re.compile(r"\s")


def _spans(text: str, rng: random.Random, count: int, query_chars: int, cont_chars: int) -> list[tuple[str, str]]:
    """``count`` (query, continuation) pairs from non-overlapping random places of ``text``."""
    length = query_chars + cont_chars
    slots = list(range(0, max(0, len(text) - length - 40), length + 40))
    rng.shuffle(slots)
    pairs = []
    for slot in slots[:count]:
        start = _next_boundary(text, slot) + 1
        cut = _next_boundary(text, start + query_chars)
        end = _next_boundary(text, cut + cont_chars)
        query, cont = text[start:cut], text[cut:end]
        if query.strip() and cont.strip():
            pairs.append((query, cont))
    return pairs


def _next_boundary(text: str, pos: int) -> int:
    match = _BOUNDARY.search(text, min(pos, len(text)))
    return match.start() if match else len(text)


def build_items(task: str, texts: dict[str, str], per_domain: int = 32, seed: int = 0,
                query_chars: int = 300, cont_chars: int = 120) -> list[dict]:
    """Items ``{"domain", "query", "choices": [4 str], "label": int}`` for ``task``."""
    task = ALIASES.get(task, task)
    if task not in LOCAL_TASKS:
        raise ValueError(f"unknown local task {task!r}; built-in: {', '.join(LOCAL_TASKS)} (alias local_mc)")
    domains = sorted(texts)
    if task == "domain_mc" and len(domains) < 4:
        raise ValueError(f"domain_mc needs texts from at least 4 domains, got {len(domains)}")
    rng = random.Random(f"{task}/{seed}")
    pool = {d: _spans(texts[d], rng, 4 * per_domain, query_chars, cont_chars) for d in domains}
    items = []
    for domain in domains:
        own = pool[domain]
        for i, (query, cont) in enumerate(own[:per_domain]):
            if task == "next_chunk":
                others = [c for j, (_, c) in enumerate(own) if j != i]
                if len(others) < 3:
                    break
                distractors = rng.sample(others, 3)
            else:
                other_domains = rng.sample([d for d in domains if d != domain and pool[d]], 3)
                distractors = [rng.choice(pool[d])[1] for d in other_domains]
            choices = [cont, *distractors]
            order = list(range(4))
            rng.shuffle(order)
            items.append({"domain": domain, "query": query, "choices": [choices[k] for k in order],
                          "label": order.index(0)})
    return items


def continuation_logprobs(model, tokenizer, pairs: list[tuple[str, str]], max_len: int = 256, batch_size: int = 8,
                          progress=None) -> list[float]:
    """Summed log-probability of each continuation given its context; list of floats.

    Batched as `loglikelihood.loglikelihoods` says (choices sharing a context share a row);
    ``progress``: ``advance(n, total)`` after each forward (``n`` more requests done)."""
    encoded = encode_requests(tokenizer, pairs, max_len)
    return loglikelihoods(model, encoded, max_len=max_len, batch_size=batch_size, progress=progress).tolist()


def score_items(model, tokenizer, items: list[dict], max_len: int = 256, batch_size: int = 8, progress=None) -> dict:
    """``{"acc", "acc_norm", "n", "per_domain": {domain: acc}}`` of the items under the model.

    ``progress``: ``advance(n, total)`` as the choices are scored (``4 * len(items)`` in all)."""
    pairs = [(item["query"], choice) for item in items for choice in item["choices"]]
    logprobs = continuation_logprobs(model, tokenizer, pairs, max_len=max_len, batch_size=batch_size,
                                     progress=progress)
    scores = torch.tensor(logprobs, dtype=torch.float64).view(len(items), 4)
    n_bytes = torch.tensor([len(c.encode("utf-8")) for item in items for c in item["choices"]],
                           dtype=torch.float64).view(len(items), 4)
    labels = torch.tensor([item["label"] for item in items], dtype=torch.long)
    # argmax takes the first of tied maxima, as lm-eval's np.argmax (and the former max(range(4))) do
    hits = scores.argmax(1) == labels
    hits_norm = (scores / n_bytes.clamp(min=1)).argmax(1) == labels
    per_domain: dict[str, list[int]] = {}
    for item, hit in zip(items, hits.tolist()):
        per_domain.setdefault(item["domain"], []).append(int(hit))
    n = max(len(items), 1)
    return {"acc": int(hits.sum()) / n, "acc_norm": int(hits_norm.sum()) / n, "n": len(items),
            "per_domain": {d: sum(v) / len(v) for d, v in per_domain.items()}}
