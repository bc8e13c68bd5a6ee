"""The timed stages of `layer_speed.py`: each runs real moepress code on the layer and counts its FLOPs.

A stage function takes the `Layer` and returns `Stage` rows. FLOPs are split by the dtype the GEMMs
run in ("model" = the layer's dtype); `E, H, I, k, T` = experts, hidden, intermediate, top-k, tokens.
Stage timings synchronise CUDA before and after. Parts of a method call are timed with
`_common.CallTimer` (observed, not patched): the method code runs as shipped.
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from _common import CallTimer
from _common import sync as _sync
from moepress.arch import MoELayerView
from moepress.calib.stats import LayerStatistics
from moepress.methods import LayerContext, build_method
from moepress.methods.d2moe.stats import FLOAT32_PRODUCT_ROWS
from moepress.methods.mergemoe.method import down_projection_equations
from moepress.methods.subset_loss import SubsetLoss
from moepress.ops.clustering import groups_of
from moepress.ops.least_squares import (
    NormalEquations, RankDeficientWarning, fit_normal_equations, times_pseudo_inverse,
)
from moepress.ops.rank_allocation import MoELayerShape, rank_for_expert_ratio
from moepress.ops.saliency import naee_search
from moepress.ops.whitened_svd import EIGEN_FLOOR, activation_error, cholesky_whitener, whitened_svd

F64 = "float64"
EIGH_FLOPS = 4  # ≈ 4n³ for eigh with vectors: tridiagonal reduction 4/3·n³ + vectors/back-transformation ≈ 8/3·n³


@dataclass
class Layer:
    view: MoELayerView
    batches: list
    device: str
    dtype: torch.dtype
    args: object
    model: object = None
    stats: LayerStatistics = field(init=False)

    def __post_init__(self):
        self.stats = LayerStatistics(self.view, self.batches)

    @property
    def tokens(self) -> int:
        return sum(b.shape[0] for b in self.batches)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def dims(self):
        v = self.view
        return v.num_experts, v.hidden_size, v.intermediate_size, v.top_k, self.tokens

    def context(self) -> LayerContext:
        return LayerContext(self.view, self.stats, 0, 1, self.model)


@dataclass
class Stage:
    name: str
    seconds: float
    flops: dict                 # dtype name -> FLOPs
    formula: str
    gemm_bound: bool
    rss_gb: float = 0.0
    cuda_gb: float = 0.0
    note: str = ""

    @property
    def total_flops(self) -> float:
        return sum(self.flops.values())

    @property
    def gflops(self) -> float:
        return self.total_flops / max(self.seconds, 1e-9) / 1e9

    def peak_fraction(self, peaks: dict) -> float:
        """Time a peak-speed GEMM would need for these FLOPs, over the measured time."""
        return sum(f / (peaks[d] * 1e9) for d, f in self.flops.items()) / max(self.seconds, 1e-9)

    def to_dict(self, peaks: dict) -> dict:
        return {"stage": self.name, "seconds": self.seconds, "flops": self.flops, "gflops_per_s": self.gflops,
                "peak_fraction": self.peak_fraction(peaks), "gemm_bound": self.gemm_bound,
                "peak_rss_gb": self.rss_gb, "peak_cuda_gb": self.cuda_gb, "formula": self.formula, "note": self.note}


def _vmhwm_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 2 ** 20
    return float("nan")


@contextmanager
def measured(layer: Layer):
    """Yields a dict that receives `seconds`, `rss_gb`, `cuda_gb` of the block it wraps."""
    try:
        with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
            f.write("5")
    except OSError:
        pass  # then VmHWM is the whole run's high-water mark
    if layer.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    _sync(layer.device)
    out = {"start": time.perf_counter()}
    with torch.no_grad():
        yield out
    _sync(layer.device)
    out["seconds"] = time.perf_counter() - out.pop("start")
    out["rss_gb"] = _vmhwm_gb()
    out["cuda_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30 if layer.device.startswith("cuda") else 0.0


def _stage(name, m, flops, formula, gemm_bound, note="") -> Stage:
    return Stage(name, m["seconds"], {d: float(f) for d, f in flops.items() if f}, formula, gemm_bound,
                 m["rss_gb"], m["cuda_gb"], note)


# ---------------------------------------------------------------- routing, saliency, features
def routing_stages(layer: Layer) -> list[Stage]:
    e, h, i, k, t = layer.dims()
    model, ctx = layer.dtype_name, layer.context()
    rows = []
    with measured(layer) as m:
        layer.stats["frequency"]
    rows.append(_stage("routing + frequency", m, {model: 2 * t * h * e}, "2·T·H·E (router GEMM)", False))
    with measured(layer) as m:
        build_method("reap", ratio=layer.args.ratio).saliency(ctx)
    rows.append(_stage("REAP saliency", m, {model: t * k * 6 * h * i + 2 * t * h * e},
                       "T·k·6·H·I (routed expert forwards) + 2·T·H·E", True))
    for name, formula, flops in (
        ("hcsmoe", "E·T·6·H·I (every expert on every token)", e * t * 6 * h * i),
        ("msmoe", "2·T·H·E + 2·T·E² (router-logit Gram)", 2 * t * h * e + 2 * t * e * e),
    ):
        method = build_method(name, ratio=layer.args.ratio)
        with measured(layer) as m:
            for statistic in method.requirements().statistics:
                ctx.stats[statistic]
        rows.append(_stage(f"{'HC-SMoE' if name == 'hcsmoe' else 'M-SMoE'} features {list(method.requirements().statistics)}", m,
                           {model: flops}, formula, name == "hcsmoe"))
    return rows


# ---------------------------------------------------------------- MergeMoE
def mergemoe_stages(layer: Layer) -> list[Stage]:
    e, h, i, k, t = layer.dims()
    method = build_method("mergemoe", ratio=layer.args.ratio)
    kept = method.config.kept_experts(e, k)
    sync = torch.cuda.synchronize if layer.device.startswith("cuda") else None
    timer = CallTimer({"fit": down_projection_equations, "solve": NormalEquations.solve}, sync=sync)
    with warnings.catch_warnings(), measured(layer) as m, timer:
        warnings.simplefilter("ignore", RankDeficientWarning)  # expected below I tokens per cluster: dual form
        expert_map, _, record = method.merge(layer.context(), kept)
    groups = groups_of(expert_map)
    accumulate = {layer.dtype_name: 0.0, F64: 0.0}
    solve = 0.0
    for c, tokens in record["fit_tokens"].items():
        size = len(groups[int(c)])
        accumulate[layer.dtype_name] += tokens * (4 + 6 * size) * h * i
        if tokens >= i:   # Gram mode: P Pᵀ and Y Pᵀ accumulated in float64, f×f Cholesky
            accumulate[F64] += 2 * tokens * i * (i + h)
            solve += i ** 3 / 3 + 2 * i * i * h + 32 * i * i
        else:             # rows held: dual form on the t×t token Gram
            solve += 2 * tokens ** 2 * i + tokens ** 3 / 3 + 2 * tokens ** 2 * h + 2 * h * tokens * i + 32 * tokens ** 2
    routes = sorted(set(record["fit_solved_by"].values()))
    fit_s, solve_s = timer.seconds["fit"], timer.seconds["solve"]
    rest = dict(m, seconds=m["seconds"] - fit_s - solve_s)
    clusters = f"{len(record['fit_tokens'])} fitted clusters, tokens {min(record['fit_tokens'].values(), default=0)}" \
               f"-{max(record['fit_tokens'].values(), default=0)}"
    return [
        _stage("MergeMoE clustering + weighted average", rest, {"float32": 4 * e * e * h * i + 6 * e * h * i},
               "4·E²·H·I (weight-similarity Gram) + 6·E·H·I (averages)", False, f"{e} -> {kept} experts"),
        _stage("MergeMoE normal equations (accumulate)", dict(m, seconds=fit_s), accumulate,
               "Σ_c t_c·(4 + 6|C|)·H·I [+ 2·t_c·I·(I+H) fp64 when t_c >= I]", True, clusters),
        _stage("MergeMoE solve", dict(m, seconds=solve_s), {F64: solve},
               "Gram: I³/3 + 2I²H; dual (t < I): 2t²I + t³/3 + 2t²H + 2HtI", True, f"route: {', '.join(routes)}"),
    ]


def full_solve_stages(layer: Layer) -> list[Stage]:
    """The f×f solve at the real intermediate size on a synthetic positive definite Gram."""
    _, h, i, _, _ = layer.dims()
    gen = torch.Generator(device=layer.device).manual_seed(1)
    low = torch.randn(i, 256, generator=gen, device=layer.device, dtype=torch.float64) / 16
    gram = low @ low.T
    gram.diagonal().add_(torch.rand(i, generator=gen, device=layer.device, dtype=torch.float64) + 0.5)
    cross = torch.randn(h, i, generator=gen, device=layer.device, dtype=torch.float64)
    with measured(layer) as m:
        solution = fit_normal_equations(cross, gram)
    rows = [_stage(f"LS solve f×f (f={i}, synthetic PD Gram)", m, {F64: i ** 3 / 3 + 2 * i * i * h + 32 * i * i},
                   "I³/3 (Cholesky) + 2·I²·H (solve) + 32·I² (eigenvalue check)", True, f"route: {solution.method}")]
    if _compare_old_routes(layer):
        with measured(layer) as m:
            times_pseudo_inverse(cross, gram)
        rows.append(_stage("  same by eigh pseudo-inverse (old route)", m, {F64: EIGH_FLOPS * i ** 3 + 4 * h * i * i},
                           f"≈{EIGH_FLOPS}·I³ (eigh) + 4·H·I²", False, "for comparison"))
    return rows


# ---------------------------------------------------------------- D²-MoE
def _gram_experts(layer: Layer) -> int:
    """Experts whose float64 Grams fit `--gram-memory-gb` (at least top-k: the router must still route)."""
    e, h, i, k, _ = layer.dims()
    per_expert = (h * h + i * i) * 8 / 1e9
    return max(k, min(e, int(layer.args.gram_memory_gb // per_expert)))


def _restricted_view(layer: Layer, count: int) -> MoELayerView:
    """The layer restricted to its first `count` experts (router rows sliced: the model's routing among them)."""
    v = layer.view
    if count == v.num_experts:
        return v
    return MoELayerView(v.select(list(range(count))), v.spec, v.config, v.layer_index)


def _svd_flops(out_f: int, in_f: int, rank: int) -> float:
    """`whitened_svd`: ΔW·S, the smaller Gram, its eigh, the outer factor, the triangular solve for ΔV."""
    small, large = min(out_f, in_f), max(out_f, in_f)
    return 2 * out_f * in_f ** 2 + 2 * large * small ** 2 + EIGH_FLOPS * small ** 3 + 2 * large * small * rank + in_f ** 2 * rank


def d2moe_stages(layer: Layer) -> list[Stage]:
    e, h, i, k, t = layer.dims()
    count = _gram_experts(layer)
    view = _restricted_view(layer, count)
    stats = LayerStatistics(view, layer.batches)
    with measured(layer) as m:
        grams = stats["expert_gram"]
    tokens = stats["frequency"].cpu()  # tokens routed to each expert (the shared statistic; routing cached)
    routed = float(tokens.sum())
    flops = _gram_flops(layer, view)
    del view, stats  # the restricted block's copy of the experts, the statistics' reference to the Grams
    keep = min(count, _svd_experts(layer))
    grams = {name: g[:keep].clone() for name, g in grams.items()}  # frees the other experts' Grams
    note = f"{count} of {e} experts ({routed / count:.0f} tokens each)" if count < e else f"{routed / e:.0f} tokens/expert"
    rows = [_stage("D²-MoE Grams (input + intermediate)", m, flops,
                   "Σ_batches Σ_j t_j·(2H² + 2I²) [float64 if t_j < 256] + t_j·4·H·I (h_j)", True, note)]
    rows += _decompose_stages(layer, grams, tokens[:keep], keep)
    return rows


def _gram_flops(layer: Layer, view: MoELayerView) -> dict:
    """FLOPs of `expert_gram` by dtype: per batch and expert, the Gram products run in float64 below
    `FLOAT32_PRODUCT_ROWS` rows, else in float32 (or the model's dtype promoted to it)."""
    h, i = view.hidden_size, view.intermediate_size
    wide = str(torch.promote_types(layer.dtype, torch.float32)).removeprefix("torch.")
    flops = {wide: 0.0, F64: 0.0, layer.dtype_name: 0.0}
    with torch.no_grad():
        for x in layer.batches:
            for rows in torch.bincount(view.route(x).index.flatten(), minlength=view.num_experts).tolist():
                flops[F64 if rows < FLOAT32_PRODUCT_ROWS else wide] += rows * (2 * h * h + 2 * i * i)
                flops[layer.dtype_name] += rows * 4 * h * i
    return flops


def _svd_experts(layer: Layer) -> int:
    if layer.args.svd_experts is not None:
        return layer.args.svd_experts
    return 1 if layer.view.intermediate_size > 4096 else 8


def _full_rank_stand_in(gram: torch.Tensor, tokens: float) -> bool:
    """A Gram from fewer tokens than its size is singular; a real calibration set (the released code uses
    ~500k tokens) is not. Adds 1e-3·mean(diag)·I in place so that the timed path is the full-rank one."""
    if tokens >= gram.shape[0]:
        return False
    gram.diagonal().add_(1e-3 * gram.diagonal().mean())
    return True


def _compare_old_routes(layer: Layer) -> bool:
    mode = layer.args.compare_old
    return mode == "yes" or (mode == "auto" and layer.view.intermediate_size <= 4096)


def _eigh_clamp_whitener(gram: torch.Tensor) -> torch.Tensor:
    """The previous `cholesky_whitener` (eigendecomposition and clamp always), timed for comparison."""
    evals, evecs = torch.linalg.eigh(gram)
    return torch.linalg.cholesky((evecs * evals.clamp_min(EIGEN_FLOOR)) @ evecs.T)


def _decompose_stages(layer: Layer, grams: dict, tokens: torch.Tensor, experts: int) -> list[Stage]:
    e, h, i, _, _ = layer.dims()
    v = layer.view
    rank = rank_for_expert_ratio(layer.args.ratio, MoELayerShape(e, h, i), i)
    weights = {"gate": v.gate_proj.detach(), "up": v.up_proj.detach(), "down": v.down_proj.detach()}
    bases = {p: w.float().mean(0) for p, w in weights.items()}  # base="mean": one [out, in] float32 each
    grams = {name: g.to(layer.device) for name, g in grams.items()}
    stand_in = False
    for j in range(experts):
        for name in ("input", "intermediate"):
            stand_in |= _full_rank_stand_in(grams[name][j], float(tokens[j]))
    whiteners = {}
    with measured(layer) as m:
        for j in range(experts):
            s_in, s_mid = cholesky_whitener(grams["input"][j]), cholesky_whitener(grams["intermediate"][j])
            whiteners[j] = {"gate": s_in, "up": s_in, "down": s_mid}
    note = "Gram + 1e-3·mean(diag)·I (t_j < n)" if stand_in else ""
    rows = [_stage("D²-MoE whiteners (Cholesky)", m, {F64: experts * ((h ** 3 + i ** 3) / 3 + 32 * (h * h + i * i))},
                   "per expert (H³ + I³)/3 (factor) + 32·(H² + I²) (eigenvalue check)", True,
                   f"{experts} expert(s); {note}")]
    if _compare_old_routes(layer):
        with measured(layer) as m:
            for name in ("input", "intermediate"):
                _eigh_clamp_whitener(grams[name][0])
        rows.append(_stage("  same by eigh + clamp (old route)", m, {F64: (EIGH_FLOPS + 2 + 1 / 3) * (h ** 3 + i ** 3)},
                           f"per expert ≈({EIGH_FLOPS} + 2 + 1/3)·(H³ + I³)", False, "1 expert, for comparison"))
    deltas = {(j, p): w[j].double() - bases[p].double() for j in range(experts) for p, w in weights.items()}
    rows += _svd_stages(layer, deltas, whiteners, grams, rank)
    return rows


def _svd_stages(layer: Layer, deltas: dict, whiteners: dict, grams: dict, rank: int) -> list[Stage]:
    experts = len(whiteners)
    factors, svd_flops, err_flops = {}, 0.0, 0.0
    with measured(layer) as m:
        for (j, p), delta in deltas.items():
            factors[j, p] = whitened_svd(delta, whiteners[j][p], rank)
            svd_flops += _svd_flops(*delta.shape, rank)
    rows = [_stage("D²-MoE whitened SVD (gate, up, down)", m, {F64: svd_flops},
                   f"per projection 2·o·n² + 2·L·S² + {EIGH_FLOPS}·S³ + 2·L·S·r + n²·r (S/L = min/max(o, n))",
                   True, f"{experts} expert(s), rank {rank}")]
    if _compare_old_routes(layer):
        with measured(layer) as m:
            for p in ("gate", "up", "down"):
                torch.linalg.svd(deltas[0, p] @ whiteners[0][p], full_matrices=False)
        rows.append(_stage("  same by LAPACK SVD (old route)", m, {}, "LAPACK gesdd, not counted", False,
                           "1 expert, for comparison"))
    with measured(layer) as m:
        for (j, p), (u, w) in factors.items():
            delta = deltas[j, p]
            gram = grams["intermediate" if p == "down" else "input"][j]
            activation_error(delta, u @ w, gram)
            activation_error(delta, torch.zeros_like(delta), gram)
            out_f, in_f = delta.shape
            err_flops += 2 * out_f * in_f * rank + 2 * (2 * out_f * in_f ** 2)
    rows.append(_stage("D²-MoE activation error (as the method)", m, {F64: err_flops},
                       "per projection 2·o·n·r (U V) + 2 × 2·o·n² (E G Eᵀ traces)", True, f"{experts} expert(s)"))
    return rows


# ---------------------------------------------------------------- NAEE
class _EnoughEvaluations(Exception):
    pass


def naee_stages(layer: Layer) -> list[Stage]:
    """NaeePruning.choose's two parts on the real layer: its loss (`methods.subset_loss.SubsetLoss`: all
    experts' outputs, the full layer, their per-token products) and `ops.saliency.naee_search` scoring
    candidates with it, stopped after
    `--naee-evaluations` subsets (the whole search is extrapolated from the time per subset)."""
    e, h, i, k, t = layer.dims()
    method = build_method("naee", ratio=layer.args.ratio)
    kept = method.kept(layer.context())
    used = min(t, method.config.max_tokens)
    exhaustive = math.comb(e, kept)
    full = exhaustive if exhaustive <= method.config.max_subsets else sum(range(kept + 1, e + 1))
    with measured(layer) as outputs:
        loss = SubsetLoss(layer.view, torch.cat(layer.batches)[:used]).squared_error  # as choose() builds it
    limit, count = layer.args.naee_evaluations, 0

    def bounded(subset):
        nonlocal count
        if count >= limit:
            raise _EnoughEvaluations
        count += 1
        return loss(subset)  # a Python float: synchronised

    with measured(layer) as m:
        try:
            naee_search(e, kept, bounded, method.config.max_subsets)
        except _EnoughEvaluations:
            pass
    per_eval = m["seconds"] / max(count, 1)
    model = layer.dtype_name
    return [
        _stage("NAEE expert outputs (all experts + full layer)", outputs,
               {model: (e + k) * used * 6 * h * i, "float64": 2 * used * h * (e * e + e)},
               "(E + k)·T·6·H·I + fp64 2·T·H·(E² + E) (per-token products)", True),
        _stage("NAEE candidate evaluation", m,
               {model: count * 2 * used * h * kept, "float64": count * used * (3 * k * k + 2 * k)},
               "per subset 2·T·H·M (router) + fp64 T·(3k² + 2k) (loss from the products)", False,
               f"{count} of {full} subsets ({per_eval:.3f} s each -> {per_eval * full:.0f} s for all)"),
    ]


STAGES = {"routing": routing_stages, "mergemoe": mergemoe_stages, "solve": full_solve_stages,
          "d2moe": d2moe_stages, "naee": naee_stages}
