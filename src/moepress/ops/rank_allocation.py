"""Parameter accounting and rank allocation for D²-MoE (paper §3.3 / Appendix Table 12, `cal_params.py`).

Two conventions (docs/algorithms.md: rank-allocation, parameter-accounting):

- **experts** (moepress default, docs/design.md#ratio): `ratio` = fraction of the routed-expert parameters
  of each compressed layer removed. We count what is actually stored: the base with its
  statically pruned channels removed (the dynamically pruned half is stored, it is chosen per
  batch) plus every expert's low-rank factors (plus any per-expert biases).
- **whole_model** (the paper's): `target` = fraction of the whole model's parameters removed, the
  base counted as `3·H·I·(1 − pp_ratio)` per layer and the rank set by `delta_ratio`
  (`r = int(H·I·delta_ratio / (H + I))`, the same for every expert, projection and layer), with
  `delta_ratio` found by bisection to tolerance 1e-4 — reproducing the paper's Table 12 exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..modeling.moepress_family import expert_parameters


def rank_from_ratio(out_features: int, in_features: int, delta_ratio: float) -> int:
    """`int(m·n·ratio / (m + n))`: the rank keeping `ratio` of a dense `[m, n]` delta's parameters."""
    return int(out_features * in_features * delta_ratio / (out_features + in_features))


def delta_parameters(experts: int, hidden: int, intermediate: int, rank: int, share_v: bool = False) -> int:
    """Stored parameters of the low-rank deltas of gate, up and down for one layer.

    Per expert and projection `[out, in]`: `U [out, r]` + `V [r, in]`; with `share_v` one `V` per
    projection serves all experts.
    """
    u = experts * rank * (intermediate + intermediate + hidden)  # gate/up U: [I, r]; down U: [H, r]
    v_per = rank * (hidden + hidden + intermediate)               # gate/up V: [r, H]; down V: [r, I]
    return u + (v_per if share_v else experts * v_per)


@dataclass(frozen=True)
class MoELayerShape:
    """Shape numbers of one MoE layer: `experts`, `hidden` (H), `intermediate` (I per expert)."""

    experts: int
    hidden: int
    intermediate: int

    @property
    def routed_parameters(self) -> int:
        return self.experts * expert_parameters(self.hidden, self.intermediate)


def rank_for_expert_ratio(
    ratio: float,
    shape: MoELayerShape,
    stored_channels: int,
    share_v: bool = False,
    bias_parameters: int = 0,
    original_parameters: int | None = None,
) -> int:
    """Largest uniform rank whose stored routed parameters are at most `(1 − ratio)` of the original.

    Args:
        ratio: fraction of the layer's routed-expert parameters removed, in [0, 1).
        shape: the original layer.
        stored_channels: intermediate channels of the base kept after static pruning.
        share_v: one V per projection (see `delta_parameters`).
        bias_parameters: per-expert biases kept as they are (gpt-oss), counted as stored.
        original_parameters: routed parameters of the original layer (default: weights only).
    Raises:
        ValueError: when the base alone already exceeds the budget (says the largest ratio possible).
    """
    original = shape.routed_parameters if original_parameters is None else original_parameters
    budget = (1.0 - ratio) * original
    base = expert_parameters(shape.hidden, stored_channels) + bias_parameters  # one expert-sized base
    per_rank = delta_parameters(shape.experts, shape.hidden, stored_channels, 1, share_v)
    if base > budget:
        most = 1.0 - base / original
        raise ValueError(
            f"ratio {ratio:.3f} leaves {budget:.0f} routed parameters per layer but the shared base alone "
            f"stores {base}; with this base pruning the largest ratio is {most:.3f} "
            f"(raise base_prune or lower the ratio)"
        )
    return int((budget - base) // per_rank)


def whole_model_compressed_parameters(
    total_parameters: int, layers: list[MoELayerShape], delta_ratio: float, pp_ratio: float, share_v: bool = False
) -> float:
    """Whole-model parameters after D²-MoE in the paper's counting (`cal_params.py`).

    Every MoE layer's routed experts are replaced by a base of `3·H·I·(1 − pp_ratio)` parameters
    (the full pruning ratio counted as removed) plus low-rank deltas at `rank_from_ratio(H, I, ·)`.
    """
    total = float(total_parameters)
    for s in layers:
        rank = rank_from_ratio(s.hidden, s.intermediate, delta_ratio)
        total -= s.routed_parameters
        total += expert_parameters(s.hidden, s.intermediate) * (1.0 - pp_ratio)
        total += delta_parameters(s.experts, s.hidden, s.intermediate, rank, share_v)
    return total


def find_delta_ratio(
    target: float,
    pp_ratio: float,
    total_parameters: int,
    layers: list[MoELayerShape],
    share_v: bool = False,
    tolerance: float = 1e-4,
) -> float:
    """`delta_ratio` in [0, 1] making the whole model `target` smaller (paper Table 12, bisection).

    Bisects like the released `find_delta_ratio` (tolerance 1e-4, midpoint returned), so the
    Mixtral-8x7B numbers of Table 12 come out to the printed digits.
    Raises ValueError when even `delta_ratio = 0` keeps too many parameters.
    """
    goal = total_parameters * (1.0 - target)
    if whole_model_compressed_parameters(total_parameters, layers, 0.0, pp_ratio, share_v) > goal:
        raise ValueError(
            f"a {target:.0%} whole-model reduction is out of reach with base pruning {pp_ratio}: the bases "
            f"and the uncompressed parts alone exceed it; lower the ratio or raise base_prune"
        )
    lo, hi = 0.0, 1.0
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        if whole_model_compressed_parameters(total_parameters, layers, mid, pp_ratio, share_v) > goal:
            hi = mid
        else:
            lo = mid
    return (lo + hi) / 2
