"""Per-expert Gram matrices for D²-MoE's whitened SVD (paper Eq. 6–8; released `get_scale.py`).

`stats["expert_gram"]` streams over the layer's calibration batches and accumulates, for every
expert j over the tokens routed to j (its top-k contains j):

- `input [E, H, H]`: `Σ x xᵀ` of the MoE-layer inputs (what gate and up see);
- `intermediate [E, I, I]`: `Σ h_j(x) h_j(x)ᵀ` of the ORIGINAL expert's intermediate activation
  (what down sees).

Precision: a batch's product of at least `FLOAT32_PRODUCT_ROWS` rows is a float32 GEMM (as the
released code, which accumulates `XᵀX` in float32 throughout; float64 inputs stay float64) added
into float64 accumulators, so rounding does not grow with the number of batches. Fewer rows go
straight into the accumulator by a float64 GEMM: there, adding an `[n, n]` float32 temporary costs
more than the product (n = 2048, 128 rows: 14 GFLOP/s that way, 25 GFLOP/s in float64, one core).

Speed: the tokens of a batch are grouped by expert with one sort (no per-expert scan of the
routing); each expert then costs one GEMM per Gram (and its own forward for `h_j`).
Accumulators and the result live on the device of the layer's statistics.

Memory: `E·(H² + I²)` float64 values per layer (Mixtral-8x7B: ≈13 GiB, dominated by I = 14336).
How many tokens each expert saw is the shared "frequency" statistic, counted once per layer.
"""

from __future__ import annotations

import torch

from ...calib.stats import LayerStatistics, statistic

FLOAT32_PRODUCT_ROWS = 256


def tokens_by_expert(index: torch.Tensor, num_experts: int) -> list[tuple[int, torch.Tensor]]:
    """`[(j, rows of the tokens routed to j)]` for the experts that received tokens, from top-k `index [T, k]`.

    One stable sort of the flattened routing; a token appears at most once per expert (top-k
    indices are distinct), so each group lists distinct rows in increasing order.
    """
    flat = index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    rows = order // index.shape[1]
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    groups = torch.split(rows, counts)
    return [(j, g) for j, g in enumerate(groups) if counts[j] > 0]


def add_gram_(accumulator: torch.Tensor, rows: torch.Tensor) -> None:
    """`accumulator += rowsᵀ rows` in place for a float64 `accumulator` (product precision: module docstring)."""
    if rows.shape[0] < FLOAT32_PRODUCT_ROWS:
        rows = rows.to(torch.float64)
        accumulator.addmm_(rows.T, rows)
    else:
        rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
        accumulator.add_(rows.T @ rows)


@statistic("expert_gram")
def expert_gram(stats: LayerStatistics) -> dict[str, torch.Tensor]:
    """`{"input": [E,H,H], "intermediate": [E,I,I]}` float64, on the device of the layer inputs."""
    view = stats.view
    e, h, i = view.num_experts, view.hidden_size, view.intermediate_size
    gram_in = torch.zeros(e, h, h, dtype=torch.float64, device=stats.device)
    gram_mid = torch.zeros(e, i, i, dtype=torch.float64, device=stats.device)
    with torch.no_grad():
        for x, routing in stats.routed():
            x = x.to(stats.device)
            for j, rows in tokens_by_expert(routing.index.to(x.device), e):
                xj = x.index_select(0, rows)
                add_gram_(gram_in[j], xj)
                add_gram_(gram_mid[j], view.intermediate(j, xj))
    return {"input": gram_in, "intermediate": gram_mid}
