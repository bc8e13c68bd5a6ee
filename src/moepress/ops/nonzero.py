"""Stored non-zero counts of sparsified experts (MoE-Pruner's unstructured / N:M zeros).

A method that zeroes expert weights in place (`moe_pruner`) keeps dense tensors, so the dense
parameter counts of `arch.parameter_counts` do not say what was removed. These helpers give the
non-zero counts next to them: from the method's layer records (what `compress` writes to
`moepress.json`, also for a streamed run whose layers are no longer in memory) and from a loaded
model (what `evaluate` reports).
"""

from __future__ import annotations

import torch
from torch import nn


def nonzero_from_records(records: dict, after: dict) -> dict | None:
    """`parameters.after_nonzero` of a run whose layer records carry `routed_nonzero` and
    `routed_parameters` (every compressed layer), else None.

    Returns `{"total", "routed_experts", "routed_sparsity"}`: total = the dense total with each
    layer's routed experts counted by their non-zeros (every other parameter counted as stored)."""
    layers = [r for r in records.values() if isinstance(r, dict)]
    if not layers or not all("routed_nonzero" in r and "routed_parameters" in r for r in layers):
        return None
    dense = sum(int(r["routed_parameters"]) for r in layers)
    nonzero = sum(int(r["routed_nonzero"]) for r in layers)
    return {"total": int(after["total"]) - dense + nonzero,
            "routed_experts": int(after["routed_experts"]) - dense + nonzero,
            "routed_sparsity": round(1 - nonzero / dense, 6) if dense else 0.0}


def model_nonzero(model: nn.Module) -> dict | None:
    """`{"total", "routed_experts"}` with the stock routed experts' weights and biases counted by their
    non-zeros, or None when no routed-expert value is exactly zero (a dense model: nothing to add).

    Only stock blocks are counted (custom moepress blocks store factors, not sparsified weights)."""
    from ..arch import decoder_layers, layer_view, parameter_counts

    dense = nonzero = 0
    with torch.no_grad():
        for i in range(len(decoder_layers(model))):
            view = layer_view(model, i)
            if view is None:
                continue
            for t in (view.gate_proj, view.up_proj, view.down_proj, view.gate_bias, view.up_bias, view.down_bias):
                if t is not None:
                    dense += t.numel()
                    nonzero += int(torch.count_nonzero(t))
    if nonzero == dense:
        return None
    counts = parameter_counts(model)
    return {"total": counts["total"] - dense + nonzero, "routed_experts": counts["routed_experts"] - dense + nonzero}
