"""Grouping N experts into M clusters, returned as an expert map `LongTensor[N]` with values in [0, M).

Merged expert i is the cluster whose smallest member index is the i-th smallest (`canonical_map`),
so M = N always gives the identity map and results do not depend on label order.
"""

from __future__ import annotations

import torch


def canonical_map(labels: torch.Tensor) -> torch.Tensor:
    """Relabel cluster labels `[N]` so clusters are numbered by their smallest member, 0..M-1."""
    labels = torch.as_tensor(labels).long().flatten()
    order: dict[int, int] = {}
    out = torch.empty_like(labels)
    for j, lab in enumerate(labels.tolist()):
        if lab not in order:
            order[lab] = len(order)
        out[j] = order[lab]
    return out


def groups_of(expert_map: torch.Tensor) -> list[list[int]]:
    """The members of each merged expert: `groups[i]` = original experts j with `expert_map[j] == i`."""
    m = int(expert_map.max()) + 1
    return [torch.nonzero(expert_map == i).flatten().tolist() for i in range(m)]


def similarity_from_gram(gram: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """`[N, N]` similarity from the Gram `G_ij = <w_i, w_j>` of flattened per-expert tensors.

    cosine: `G_ij / sqrt(G_ii G_jj)`; l2: `-sqrt(G_ii + G_jj - 2 G_ij)` (negative distance). Working from
    the Gram avoids concatenating/copying the experts (Mixtral-8x7B: 8 × 117M numbers).
    """
    g = gram.double()
    d = g.diagonal()
    if metric == "cosine":
        norms = d.clamp_min(1e-300).sqrt()
        return g / torch.outer(norms, norms)
    if metric == "l2":
        return -(d[:, None] + d[None, :] - 2 * g).clamp_min(0).sqrt()
    raise ValueError(f"metric must be 'cosine' or 'l2', got {metric!r}")


def centre_grouping(frequency: torch.Tensor, similarity: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Top-M experts by frequency are centres; every other expert joins its most similar centre.

    MergeMoE Section 4 (clustering step) and M-SMoE's "dominant experts" grouping (MC-SMoE §3.2).
    Ties in frequency are broken by the lower expert index (stable sort), so the result is deterministic.

    Args:
        frequency: `[N]` usage counts; similarity: `[N, N]` (larger = closer); num_groups: M.
    Returns:
        expert map `[N]` (canonical numbering).
    """
    frequency, similarity = frequency.detach().cpu(), similarity.detach().cpu()  # [N] decisions: CPU
    n = frequency.numel()
    if not 1 <= num_groups <= n:
        raise ValueError(f"num_groups must be in [1, {n}], got {num_groups}")
    order = torch.sort(frequency.double(), descending=True, stable=True).indices
    centres = order[:num_groups]
    labels = torch.empty(n, dtype=torch.long)
    labels[centres] = torch.arange(num_groups)
    for j in order[num_groups:].tolist():
        labels[j] = int(torch.argmax(similarity[j, centres].double()))
    return canonical_map(labels)


def trivial_grouping(n: int, num_groups: int) -> torch.Tensor | None:
    """The expert map of the cases every grouping shares: M = N (identity) and M = 1 (one group).

    Raises on M outside [1, N]; returns None when the grouping has a real choice to make.
    """
    if not 1 <= num_groups <= n:
        raise ValueError(f"num_groups must be in [1, {n}], got {num_groups}")
    if num_groups == n:
        return torch.arange(n)
    if num_groups == 1:
        return torch.zeros(n, dtype=torch.long)
    return None


def hierarchical_grouping(features: torch.Tensor, num_groups: int, linkage: str = "average",
                          metric: str = "cosine") -> torch.Tensor:
    """Agglomerative clustering of the rows of `features [N, D]` into M groups (HC-SMoE §3.2).

    Uses `scipy.cluster.hierarchy.linkage(method=linkage, metric=metric)` and cuts the tree at M
    clusters (`cut_tree`). Returns the canonical expert map `[N]`.
    """
    from scipy.cluster.hierarchy import cut_tree, linkage as scipy_linkage

    trivial = trivial_grouping(features.shape[0], num_groups)
    if trivial is not None:
        return trivial
    f = features.detach().double().flatten(1).cpu().numpy()  # [N, D] features from any device
    tree = scipy_linkage(f, method=linkage, metric=metric)
    # cut_tree gives exactly M clusters even when merge heights tie (e.g. identical experts)
    labels = cut_tree(tree, n_clusters=num_groups)[:, 0]
    return canonical_map(torch.as_tensor(labels))
