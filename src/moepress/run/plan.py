"""Layer selection (`--layers SPEC`) and per-layer expert budgets (`--budget uniform|auto`).

`--layers` names the decoder layers (indices as in moepress.json) whose MoE blocks are compressed;
every other layer is left bit-identical (the pipeline still runs it, so the calibration hidden
states reaching the next selected layer are right). `--ratio` / `--experts` then mean the ratio /
count *within the selected layers*; the record also says what fraction of the whole model's
routed-expert parameters went.

`--budget auto` (methods that keep M experts per layer: pruning and merging) spends the same total
number of kept experts as the uniform plan, `Σ_i m_i = Σ_i round(N_i (1 - ratio))`, but gives more
experts to the layers that need them. Sensitivity is measured once, before compressing, on the
ORIGINAL model (one decoder layer at a time through the layer store, as D²-MoE's Fisher pass):
for every selected MoE layer i and every allowed count m, `e_i(m)` is the fraction of the block's
output energy lost when only its m most-used experts are kept (the model's routing over those
survivors, renormalised as the family does):

    e_i(m) = Σ_x ‖B_i^m(x) − B_i(x)‖² / Σ_x ‖B_i(x)‖²   over the calibration tokens x,

`B_i` the original block, `B_i^m` the block pruned to its m most frequently routed experts. It is
a pruning proxy for merging too: it measures how much a layer relies on its less used experts,
which is what either kind of method has to make up for. The counts minimise `Σ_i e_i(m_i)`
(every layer sees the same tokens, so this is the token-weighted sum) subject to the total and to
`floor_i <= m_i <= N_i` and the routing's constraints (`validate_expert_count`), by dynamic
programming over layers — exact for this separable objective, also where a curve is not convex
(a greedy marginal-gain allocation is optimal only for convex curves).

The floor (default `max(top_k, ceil(N/4))`, never above the uniform count) keeps every layer able
to route: top-k is the hard minimum, and a quarter of the experts bounds how far one layer may be
cut on the strength of a finite calibration sample (the curves are measured on calibration text;
a layer squeezed to top-k would have no spare experts for text the calibration did not cover).

This module's top level imports no torch (the CLI checks SPEC before any heavy import).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..checks import InputError

BUDGETS = ("uniform", "auto")
_ITEM = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_layer_spec(spec: str) -> list[int]:
    """Decoder-layer indices named by SPEC: comma-separated indices and inclusive ranges
    (`12-47`, `0,2,4`, `1-3,8`), sorted, without repeats. Only the syntax is checked here."""
    if spec is None or not str(spec).strip():
        raise InputError("--layers: empty SPEC; give layer indices and ranges such as '12-47' or '0,2,4'")
    out: set[int] = set()
    for item in str(spec).split(","):
        match = _ITEM.match(item)
        if match is None:
            raise InputError(f"--layers: cannot read {item.strip()!r} in {spec!r}; give decoder-layer indices and "
                             f"inclusive ranges separated by commas, e.g. '12-47' or '0,2,4'")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise InputError(f"--layers: range {item.strip()!r} runs backwards; write it as '{hi}-{lo}'")
        out.update(range(lo, hi + 1))
    return sorted(out)


def compact_ranges(indices) -> str:
    """`[1, 2, 3, 5]` -> `'1-3,5'` (how errors and the record list layers)."""
    indices = sorted(indices)
    parts, start = [], None
    for k, i in enumerate(indices):
        if start is None:
            start = i
        if k + 1 == len(indices) or indices[k + 1] != i + 1:
            parts.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ",".join(parts)


def resolve_layers(spec: str | None, moe_indices: list[int]) -> list[int]:
    """The selected MoE layers: all of them for None, else SPEC's indices, each of which must be a
    MoE layer (a dense layer, e.g. DeepSeek's first ones, or one past the end is an error)."""
    if spec is None:
        return list(moe_indices)
    wanted = parse_layer_spec(spec)
    bad = [i for i in wanted if i not in set(moe_indices)]
    if bad:
        raise InputError(f"--layers {spec}: layer(s) {compact_ranges(bad)} are not MoE layers of this model; "
                         f"its MoE layers are {compact_ranges(moe_indices)} (decoder-layer indices)")
    return wanted


def check_budget(budget: str, floor: int | None = None) -> None:
    """Refuse an unknown budget mode or an unusable floor (before any work)."""
    if budget not in BUDGETS:
        raise InputError(f"--budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
    if floor is not None:
        if budget != "auto":
            raise InputError("--budget-floor applies to --budget auto only")
        if isinstance(floor, bool) or not isinstance(floor, int) or floor < 1:
            raise InputError(f"--budget-floor must be a positive number of experts, got {floor!r}")


def check_method_plan(name: str, needs, layers: str | None, budget: str) -> None:
    """Refuse plan options method `name` cannot honour, from its `Requirements` `needs` (a
    `ConfigError` saying what to do)."""
    from ..methods import ConfigError

    if layers is not None:
        parse_layer_spec(layers)
        if not needs.layer_subset:
            raise ConfigError(f"method {name!r} allocates its budget across all MoE layers itself and "
                              f"cannot compress a subset; run it without --layers")
    if budget == "auto" and not needs.expert_count:
        raise ConfigError(f"--budget auto sets the number of experts each layer keeps, which only methods that keep "
                          f"M experts per layer (pruning and merging) use; method {name!r} does not: use "
                          f"--budget uniform")


def default_floor(num_experts: int, top_k: int) -> int:
    """`max(top_k, ceil(N / 4))`, capped at N (module doc: why)."""
    return min(num_experts, max(int(top_k), math.ceil(num_experts / 4)))


@dataclass
class LayerPlan:
    """What the pipeline compresses: `selected` decoder-layer indices and, for methods that keep M
    experts per layer, each one's count (`experts`, empty = the method's own `--ratio`/`--experts`).

    spec: the `--layers` SPEC (None = every MoE layer); budget: `uniform` or `auto`; floor, curves:
    the auto budget's floor and measured sensitivity curves `{layer: {m: e(m)}}`."""

    selected: list[int]
    experts: dict[int, int] = field(default_factory=dict)
    spec: str | None = None
    budget: str = "uniform"
    floor: int | None = None
    curves: dict[int, dict[int, float]] = field(default_factory=dict)
    uniform: dict[int, int] = field(default_factory=dict)

    def budget_record(self) -> dict:
        """`budget` of moepress.json: mode, floor, the per-layer counts (and, for auto, the uniform
        counts it replaced and the rounded sensitivity curves)."""
        out = {"mode": self.budget, "floor": self.floor,
               "experts": {str(k): v for k, v in sorted(self.experts.items())}}
        if self.budget == "auto":
            out["uniform_experts"] = {str(k): v for k, v in sorted(self.uniform.items())}
            out["objective"] = "sum over layers of the block output energy lost, keeping the m most-used experts"
            out["sensitivity"] = {str(i): {str(m): round(float(e), 6) for m, e in sorted(c.items())}
                                  for i, c in sorted(self.curves.items())}
            out["predicted_error"] = {"uniform": round(self._total(self.uniform), 6),
                                      "auto": round(self._total(self.experts), 6)}
        return out

    def _total(self, counts: dict[int, int]) -> float:
        return float(sum(self.curves[i].get(m, 0.0) for i, m in counts.items()))

    def key(self) -> list | None:
        """What identifies the plan for resuming a bounded-memory run (None for the default plan:
        every layer, uniform counts, which the method's config already identifies)."""
        if self.spec is None and self.budget == "uniform":
            return None
        return [self.selected, sorted(self.experts.items())]


def allowed_counts(view, floor: int) -> list[int]:
    """Expert counts from `floor` to N that this layer's routing accepts (`validate_expert_count`)."""
    from ..arch import validate_expert_count

    out = []
    for m in range(max(1, floor), view.num_experts + 1):
        try:
            validate_expert_count(view.config, m)
        except ValueError:
            continue
        out.append(m)
    return out


def allocate(curves: list[dict[int, float]], total: int) -> list[int]:
    """Counts `m_i` (keys of `curves[i]`) minimising `Σ_i curves[i][m_i]` with `Σ_i m_i == total`
    (the reachable total closest to it): `ops.expert_allocation.allocate_min_sum`, the exact
    dynamic programme MoE-I²'s layer allocation uses too."""
    from ..ops.expert_allocation import allocate_min_sum

    try:
        return allocate_min_sum(curves, total)
    except ValueError:
        raise InputError("no per-layer expert counts satisfy the floor and the routing constraints") from None


def pruned_block_output(view, keep: list[int], x):
    """The block's output on flat tokens `x [T, H]` with only experts `keep` (ascending), exactly
    as the block `view.select(keep)` computes it, without copying expert weights: the router is
    the view's restricted to `keep` (`subset_router`), and its choices index the live experts.
    Group-limited routing regroups survivors, so there the pruned block itself is built."""
    import torch

    if view.group_routing is not None:
        return view.forward(x, view.select(keep))
    router = view.subset_router(keep)
    _, weights, index = router(x)
    ids = torch.as_tensor(keep, dtype=torch.long, device=index.device)
    out = view.experts(x, ids[index], weights)
    shared = view.shared_output(x)
    return out if shared is None else out + shared


def sensitivity_curve(view, batches, counts: list[int], reduce=None) -> dict[int, float]:
    """`{m: e(m)}` for this layer (module doc): output energy lost keeping its m most-used experts.

    batches: the block's flat inputs `[t, H]` on the original model. `reduce` sums over
    data-parallel ranks (`LayerStatistics.reduce`)."""
    import torch

    from ..calib import LayerStatistics

    stats = LayerStatistics(view, batches)
    freq = stats["frequency"]
    order = sorted(range(view.num_experts), key=lambda j: (-float(freq[j]), j))
    curve = {}
    with torch.no_grad():
        refs = [view.forward(x).double() for x in batches]
        den = sum(float(r.pow(2).sum()) for r in refs)
        if reduce is not None:
            den = reduce(den)
        for m in counts:
            if m >= view.num_experts:
                curve[m] = 0.0
                continue
            keep = sorted(order[:m])
            num = sum(float((pruned_block_output(view, keep, x).double() - r).pow(2).sum())
                      for x, r in zip(batches, refs))
            if reduce is not None:
                num = reduce(num)
            curve[m] = num / max(den, 1e-300)
    return curve


def measure_sensitivity(model, calibration, selected: list[int], floors: dict[int, int], *, store, batch_size: int,
                        device=None) -> dict[int, dict[int, float]]:
    """Sensitivity curves of the selected MoE layers on the ORIGINAL model, one decoder layer at a
    time (`store.load_original` / `store.release`), so memory stays one layer + the hidden states."""
    import torch

    from ..arch import layer_view
    from ..calib import LayerStatistics
    from .walk import capture_layer_inputs, collect_block_inputs, run_layer, source_layers, to_device

    device = torch.device(device) if device is not None else None
    hidden, kwargs = capture_layer_inputs(model, calibration, batch_size)
    kwargs = to_device(kwargs, device)
    curves: dict[int, dict[int, float]] = {}
    last = max(selected)
    for i, layer in source_layers(store, range(last + 1), device):
        if i in floors:
            view = layer_view(model, i)
            inputs = collect_block_inputs(layer, view.block, i, hidden, kwargs, device)
            curves[i] = sensitivity_curve(view, inputs, allowed_counts(view, floors[i]), LayerStatistics.reduce)
            del inputs
        if i < last:
            hidden = run_layer(layer, i, hidden, kwargs, device)
    return curves


def build_plan(model, method, calibration, *, layers: str | None = None, budget: str = "uniform",
               floor: int | None = None, store=None, batch_size: int = 8, device=None) -> LayerPlan:
    """The plan for `method` on `model` (module doc). For `budget="auto"` this runs the sensitivity
    pass over `calibration` first."""
    from ..arch import layer_view, moe_layer_indices
    from .store import InMemoryLayers
    from ..methods import ConfigError

    check_budget(budget, floor)
    needs = method.requirements()
    check_method_plan(method.name, needs, layers, budget)
    selected = resolve_layers(layers, moe_layer_indices(model))
    plan = LayerPlan(selected=selected, spec=layers, budget=budget)
    if not needs.expert_count:
        return plan
    views = {i: layer_view(model, i) for i in selected}
    for i, view in views.items():
        plan.uniform[i] = method.config.kept_experts(view.num_experts, view.top_k)
    if budget == "uniform":
        plan.experts = dict(plan.uniform)
        return plan
    if calibration is None:
        raise ConfigError("--budget auto measures layer sensitivity on calibration text; this method reads none")
    floors = {}
    for i, view in views.items():
        f = default_floor(view.num_experts, view.top_k) if floor is None else int(floor)
        if floor is None:
            f = min(f, plan.uniform[i])
        elif f > plan.uniform[i]:
            raise ConfigError(f"--budget-floor {floor} exceeds the uniform count {plan.uniform[i]} of layer {i}: "
                              f"the total could not be kept; give a floor <= {min(plan.uniform.values())}")
        elif f > view.num_experts:
            raise ConfigError(f"--budget-floor {floor} exceeds layer {i}'s {view.num_experts} experts")
        floors[i] = max(f, view.top_k)  # allowed_counts also skips counts the routing refuses
    plan.floor = floor if floor is not None else min(floors.values())
    plan.curves = measure_sensitivity(model, calibration, selected, floors, store=store or InMemoryLayers(model),
                                      batch_size=batch_size, device=device)
    counts = allocate([plan.curves[i] for i in selected], sum(plan.uniform.values()))
    plan.experts = dict(zip(selected, counts))
    return plan


def selection_record(plan: LayerPlan, before: dict, after: dict) -> dict:
    """`layer_selection` of moepress.json: the layers compressed and the routed-parameter fractions
    removed within them and over the whole model (`parameter_counts` before/after)."""
    removed = before["routed_experts"] - after["routed_experts"]
    # routed parameters of the selected layers: experts are equal-sized within a model (every family here)
    per_expert = before["routed_experts"] / max(sum(before["experts_per_layer"].values()), 1)
    sel_before = sum(before["experts_per_layer"].get(i, 0) * per_expert for i in plan.selected)
    return {
        "spec": plan.spec,
        "layers": list(plan.selected),
        "layers_compact": compact_ranges(plan.selected),
        "routed_fraction_removed_selected": round(removed / sel_before, 6) if sel_before else None,
        "routed_fraction_removed_model": round(removed / before["routed_experts"], 6)
        if before["routed_experts"] else None,
    }
