"""ZipIt!-style neuron zipping for expert merging (Stoica et al. 2023, §3–4), adapted to SwiGLU experts.

Adaptation (documented deviation): ZipIt merges the features of whole networks layer by layer; here
one merge step zips the intermediate neurons of two SwiGLU experts (the running merged expert and the
next group member). From the correlation matrix of their 2I intermediate activations, disjoint
neuron pairs are chosen greedily by descending correlation — within one expert or across the two,
as in ZipIt — until I pairs remain. A pair's merged neuron takes the weight-averaged gate/up rows of
its members ("merge" matrix) and the weight-scaled sum of their down columns ("unmerge": each
original neuron's output is replaced by the merged neuron's, so both down columns read it).
"""

from __future__ import annotations

import torch


def activation_correlation(mean: torch.Tensor, second_moment: torch.Tensor) -> torch.Tensor:
    """Pearson correlation `[F, F]` from streamed `E[h] [F]` and `E[h hᵀ] [F, F]` (fp64)."""
    cov = second_moment - torch.outer(mean, mean)
    std = cov.diagonal().clamp_min(1e-12).sqrt()
    return cov / torch.outer(std, std)


def greedy_pairs(correlation: torch.Tensor) -> list[tuple[int, int]]:
    """Disjoint pairs covering all `2I` features, chosen by descending correlation (ZipIt's greedy matching).

    Returns I pairs `(a, b)` of feature indices (a != b).
    """
    n = correlation.shape[0]
    if n % 2:
        raise ValueError("greedy_pairs needs an even number of features")
    iu = torch.triu_indices(n, n, offset=1)
    values = correlation[iu[0], iu[1]]
    order = torch.argsort(values, descending=True, stable=True)
    used = torch.zeros(n, dtype=torch.bool)
    pairs = []
    for k in order.tolist():
        a, b = int(iu[0, k]), int(iu[1, k])
        if used[a] or used[b]:
            continue
        used[a] = used[b] = True
        pairs.append((a, b))
        if len(pairs) == n // 2:
            break
    return pairs


def zip_two_experts(first: dict, second: dict, w_first: float, w_second: float,
                    pairs: list[tuple[int, int]]) -> dict:
    """Zip two experts (dicts with `gate, up [I,H]`, `down [H,I]`, optional `gate_bias, up_bias [I]`).

    Feature index a < I is neuron a of `first`, a >= I is neuron a - I of `second`. The merged expert
    approximates `w_first E_first + w_second E_second` (then divided by w_first + w_second, i.e. the
    result is a weighted *average* expert). Returns the merged dict (down bias: weighted average).
    """
    i_size = first["gate"].shape[0]
    total = max(w_first + w_second, 1e-300)
    in_rows = {k: torch.cat([first[k], second[k]], 0) for k in ("gate", "up")}
    scale = torch.cat([torch.full((i_size,), w_first), torch.full((i_size,), w_second)]).to(first["gate"].dtype)
    down_cols = torch.cat([first["down"] * w_first, second["down"] * w_second], 1) / total
    has_bias = first.get("gate_bias") is not None
    if has_bias:
        in_rows["gate_bias"] = torch.cat([first["gate_bias"], second["gate_bias"]])
        in_rows["up_bias"] = torch.cat([first["up_bias"], second["up_bias"]])
    a = torch.tensor([p[0] for p in pairs])
    b = torch.tensor([p[1] for p in pairs])
    wa, wb = scale[a], scale[b]
    denom = wa + wb
    # two never-routed neurons (weight 0 each) are averaged plainly instead of dividing by zero
    ca = torch.where(denom > 0, wa / denom.clamp_min(1e-300), torch.full_like(wa, 0.5))
    out = {}
    for k, rows in in_rows.items():
        shape = (-1,) + (1,) * (rows.dim() - 1)
        out[k] = rows[a] * ca.view(shape) + rows[b] * (1 - ca).view(shape)
    out["down"] = down_cols[:, a] + down_cols[:, b]
    if first.get("down_bias") is not None:
        out["down_bias"] = (first["down_bias"] * w_first + second["down_bias"] * w_second) / total
    return out
