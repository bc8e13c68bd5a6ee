"""Per-expert Gram matrices for D²-MoE's whitened SVD (paper Eq. 6–8; released `get_scale.py`).

`stats["expert_gram"]` streams over the layer's calibration batches and accumulates, in float64,
for every expert j over the tokens routed to j (its top-k contains j):

- `input [E, H, H]`: `Σ x xᵀ` of the MoE-layer inputs (what gate and up see);
- `intermediate [E, I, I]`: `Σ h_j(x) h_j(x)ᵀ` of the ORIGINAL expert's intermediate activation
  (what down sees).

Memory: `E·(H² + I²)` float64 values per layer (Mixtral-8x7B: ≈13 GiB, dominated by I = 14336).
How many tokens each expert saw is the shared "frequency" statistic, counted once per layer.
"""

from __future__ import annotations

import torch

from ...calib.stats import LayerStatistics, statistic


@statistic("expert_gram")
def expert_gram(stats: LayerStatistics) -> dict[str, torch.Tensor]:
    """`{"input": [E,H,H], "intermediate": [E,I,I]}` float64, on CPU."""
    view = stats.view
    e, h, i = view.num_experts, view.hidden_size, view.intermediate_size
    gram_in = torch.zeros(e, h, h, dtype=torch.float64)
    gram_mid = torch.zeros(e, i, i, dtype=torch.float64)
    for x, routing in stats.routed():
        routed_to = routing.index
        for j in torch.unique(routed_to).tolist():
            rows = (routed_to == j).any(dim=-1).nonzero().squeeze(-1)
            xj = x.index_select(0, rows)
            xd = xj.double()
            gram_in[j] += (xd.T @ xd).cpu()
            with torch.no_grad():
                hj = view.intermediate(j, xj).double()
            gram_mid[j] += (hj.T @ hj).cpu()
    return {"input": gram_in, "intermediate": gram_mid}
