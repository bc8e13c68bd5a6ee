"""Stored non-zero counts of sparsified experts (MoE-Pruner's unstructured / N:M zeros).

A method that zeroes expert weights in place (`moe_pruner`) keeps dense tensors, so the dense
parameter counts of `arch.parameter_counts` do not say what was removed. This helper gives the
non-zero counts next to them, from the method's layer records (what `compress` writes to
`moepress.json`, also for a streamed run whose layers are no longer in memory); the count over a
loaded model (what `evaluate` reports) is `arch.model_nonzero`, beside `parameter_counts`.
"""

from __future__ import annotations


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
