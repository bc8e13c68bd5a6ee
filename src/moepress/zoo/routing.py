"""Expert-usage capture and the per-domain specialisation statistic of the reference models.

Routers in transformers 5 return ``(logits, top_k_weights, top_k_index)``; a forward hook on the
router of every MoE layer (found by ``moepress.arch``, which knows each family's router
attribute) sees the real routing, DeepSeek's correction bias and group limits included.
"""

from __future__ import annotations

import itertools
import math
from contextlib import contextmanager

import torch

from ..arch import moe_layer_views


@contextmanager
def capture_expert_counts(model: torch.nn.Module):
    """Yields ``counts: dict[router module name, Tensor[E]]`` accumulating top-k selections per expert."""
    counts: dict[str, torch.Tensor] = {}
    handles = []
    names = {id(module): name for name, module in model.named_modules()}

    def make_hook(name, num_experts):
        def hook(module, args, output):
            index = output[-1]
            selected = torch.bincount(index.reshape(-1).cpu(), minlength=num_experts).double()
            counts[name] = counts.get(name, torch.zeros(num_experts, dtype=torch.float64)) + selected

        return hook

    for view in moe_layer_views(model):
        handles.append(view.router.register_forward_hook(make_hook(names[id(view.router)], view.num_experts)))
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def jensen_shannon(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence in bits (0 = identical, 1 = disjoint) of two histograms."""
    p = p.double() / p.sum()
    q = q.double() / q.sum()
    m = 0.5 * (p + q)

    def kl(a, b):
        mask = a > 0
        return float((a[mask] * (a[mask] / b[mask]).log2()).sum())

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


@torch.no_grad()
def domain_expert_usage(model, token_streams: dict[str, torch.Tensor], seq_len: int = 256, max_windows: int = 16):
    """Per domain, per router layer: the normalised expert-usage histogram on that domain's tokens."""
    usage: dict[str, dict[str, torch.Tensor]] = {}
    for domain, ids in token_streams.items():
        windows = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)][:max_windows]
        if not windows:
            continue
        with capture_expert_counts(model) as counts:
            model(torch.stack(windows))
        usage[domain] = {name: c / c.sum() for name, c in counts.items()}
    return usage


def specialisation_report(usage: dict[str, dict[str, torch.Tensor]]) -> dict:
    """Mean pairwise Jensen-Shannon divergence between domains, averaged over layers.

    Also the per-layer values, each domain's JSD to the all-domain average, and the
    normalised entropy of the pooled usage (1.0 = perfectly balanced experts).
    """
    domains = sorted(usage)
    layers = sorted(set.intersection(*(set(usage[d]) for d in domains))) if domains else []
    per_layer = {}
    per_domain = {d: 0.0 for d in domains}
    balance = {}
    for layer in layers:
        pairs = [jensen_shannon(usage[a][layer], usage[b][layer]) for a, b in itertools.combinations(domains, 2)]
        per_layer[layer] = sum(pairs) / max(len(pairs), 1)
        pooled = torch.stack([usage[d][layer] for d in domains]).mean(0)
        for d in domains:
            per_domain[d] += jensen_shannon(usage[d][layer], pooled) / len(layers)
        entropy = -float((pooled[pooled > 0] * pooled[pooled > 0].log()).sum())
        balance[layer] = entropy / math.log(len(pooled))
    return {
        "mean_pairwise_jsd_bits": sum(per_layer.values()) / max(len(per_layer), 1),
        "per_layer_jsd_bits": per_layer,
        "domain_jsd_to_mean_bits": per_domain,
        "usage_balance_entropy": balance,
        "domains": domains,
    }
