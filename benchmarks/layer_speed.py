"""Throughput of every heavy compression stage on one MoE layer of a real model's shape, against this machine's GEMM peak.

    PYTHONPATH=src .venv/bin/python benchmarks/layer_speed.py [--shapes mixtral,qwen3] [--tokens 2048]
        [--hidden H] [--intermediate I] [--dtype float32|bfloat16] [--device cpu|cuda] [--quick]
        [--threads N] [--json out.json]

Shapes: Mixtral-8x7B (H 4096, I 14336, 8 experts, top-2) and Qwen3-30B-A3B (H 2048, I 768, 128
experts, top-8). `--hidden` / `--intermediate` replace those widths (`--shapes mixtral --hidden 1024
--intermediate 3584`: the scaled Mixtral layer the speed notes of moepress.ops quote). `--quick`
shrinks both shapes to H 128, I 448 / 48 (same experts and top-k), 256 tokens and 2 SVD'd experts:
a smoke run of every stage, seconds (an option given is kept: `--quick --tokens 2048`).

The model is built from its transformers config on the meta device and only the MoE block is
materialised (random N(0, 0.02) experts, router rows N(0, 1/H) so routing is spread); activations
are N(0, 1) tokens. Every stage runs the real method code on the real `MoELayerView` (statistics,
`merge`, ops), timed from outside (`_layer_speed_stages.py`; parts of one method call with
`_common.CallTimer`, which observes the calls instead of replacing the functions).

FLOPs are counted analytically per stage (formulas printed under the table) and split by the
dtype each GEMM runs in; "% peak" = Σ_dtype(FLOPs / peak_dtype) / time, i.e. the share of the
wall time a GEMM running at the measured peak would need, with peaks measured in this run by
square matmuls of the layer's hidden size (best of the runs before and after the stages). Peak
memory: the process's VmHWM, reset before each stage (weights and earlier results stay resident,
so it is a high-water mark, not a delta); with `--device cuda` also `torch.cuda.max_memory_allocated`
per stage.

Bounded stages (said in their row): D²-MoE Grams on the experts that fit `--gram-memory-gb` (the
block restricted to them; Mixtral's intermediate Grams are 1.6 GiB each), whitener/SVD on
`--svd-experts` experts, NAEE on `--naee-evaluations` candidate subsets; the f×f solve uses a
synthetic positive definite Gram of the real size, since reaching Gram mode needs more than I
tokens per cluster.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
import transformers
from _common import gemm_gflops as gemm_peak
from _common import print_provenance, quick
from _layer_speed_stages import STAGES, Layer

from moepress.arch import moe_layer_views
from moepress.testing import tiny_config

SHAPES = {
    "mixtral": ("mixtral", dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2)),
    "qwen3": ("qwen3_moe", dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8)),
}
QUICK = {"mixtral": dict(hidden_size=128, intermediate_size=448), "qwen3": dict(hidden_size=128, moe_intermediate_size=48)}


def build_layer(shape: str, args) -> Layer:
    """The MoE block of a one-layer model of `shape` (meta device, block materialised) + calibration tokens."""
    family, dims = SHAPES[shape]
    dims = {**dims, **(QUICK.get(shape, {}) if args.quick else {})}
    width = next(key for key in dims if key.endswith("intermediate_size"))  # the experts' width
    dims.update({k: v for k, v in (("hidden_size", args.hidden), (width, args.intermediate)) if v is not None})
    config = tiny_config(family, num_layers=1, **dims)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=args.torch_dtype)
    view = moe_layer_views(model)[0]
    view.block.to_empty(device=args.device)
    gen = torch.Generator(device=args.device).manual_seed(0)
    with torch.no_grad():
        for name, p in view.block.named_parameters():
            std = 1.0 / math.sqrt(view.hidden_size) if p.dim() == 2 else 0.02  # router rows vs experts
            p.copy_(torch.randn(p.shape, generator=gen, device=args.device) * std)
    batches = [torch.randn(min(args.batch, args.tokens - start), view.hidden_size, generator=gen,
                           device=args.device).to(args.torch_dtype)
               for start in range(0, args.tokens, args.batch)]
    return Layer(view=view, batches=batches, device=args.device, dtype=args.torch_dtype, args=args, model=model)


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def print_table(shape: str, layer: Layer, peaks: dict, stages: list) -> None:
    v = layer.view
    print(f"\n== {shape}: H {v.hidden_size}, I {v.intermediate_size}, {v.num_experts} experts, top-{v.top_k}; "
          f"{layer.tokens} tokens; {layer.dtype_name}; {layer.device}; {torch.get_num_threads()} threads")
    print("GEMM peak (square n={}): ".format(v.hidden_size)
          + ", ".join(f"{k} {g:.1f} GFLOP/s" for k, g in peaks.items()))
    cuda = layer.device.startswith("cuda")
    width = max(46, *(len(s.name) for s in stages))
    head = f"{'stage':<{width}} {'s':>8} {'GFLOP':>9} {'GFLOP/s':>8} {'%peak':>6} {'RSS GB':>7}"
    print(head + (f" {'GPU GB':>7}" if cuda else "") + "  note")
    for s in stages:
        row = (f"{s.name:<{width}} {s.seconds:8.2f} {s.total_flops / 1e9:9.1f} {s.gflops:8.1f} "
               f"{s.peak_fraction(peaks) * 100:5.0f}{'*' if s.gemm_bound else ' '} {s.rss_gb:7.2f}")
        print(row + (f" {s.cuda_gb:7.2f}" if cuda else "") + f"  {s.note}")
    print("(* GEMM-bound stage, goal >= 50% of peak)  FLOP formulas:")
    for s in stages:
        print(f"  {s.name}: {s.formula}")


def run_shape(shape: str, args) -> dict:
    layer = build_layer(shape, args)
    dtypes = {args.torch_dtype, torch.float32, torch.float64}
    peaks = {str(d).removeprefix("torch."): gemm_peak(layer.view.hidden_size, d, args.device) for d in dtypes}
    stages = []
    for group in args.stages.split(","):
        rows = STAGES[group](layer)
        for row in rows:  # progress: the table comes once the shape is done
            print(f"  [{shape}] {row.name}: {row.seconds:.1f} s", file=sys.stderr, flush=True)
        stages.extend(rows)
    for d in dtypes:  # again after the stages: on a shared machine the best of both is the peak
        name = str(d).removeprefix("torch.")
        peaks[name] = max(peaks[name], gemm_peak(layer.view.hidden_size, d, args.device))
    print_table(shape, layer, peaks, stages)
    return {"shape": shape, "hidden": layer.view.hidden_size, "intermediate": layer.view.intermediate_size,
            "experts": layer.view.num_experts, "top_k": layer.view.top_k, "tokens": layer.tokens,
            "dtype": layer.dtype_name, "device": args.device, "threads": torch.get_num_threads(),
            "gemm_peak_gflops": peaks, "stages": [s.to_dict(peaks) for s in stages]}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="mixtral,qwen3", help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--tokens", type=int, default=2048, help="calibration tokens of the layer")
    parser.add_argument("--batch", type=int, default=2048,
                        help="tokens per calibration batch (the pipeline: batch_size 8 × seq_len 256)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weights and activations")
    parser.add_argument("--device", default="cpu", help="cpu | cuda[:i]")
    parser.add_argument("--quick", action="store_true", help="H 128, I 448 / 48, 256 tokens, 2 SVD'd experts (smoke run)")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size instead of the shape's (every shape)")
    parser.add_argument("--intermediate", type=int, default=None, help="expert width instead of the shape's")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--ratio", type=float, default=0.5, help="compression ratio given to the methods")
    parser.add_argument("--gram-memory-gb", type=float, default=5.0,
                        help="budget for D²-MoE's float64 Grams; the block is restricted to the experts that fit")
    parser.add_argument("--svd-experts", type=int, default=None, help="experts whitened + SVD'd (default 1 if I > 4096, else 8)")
    parser.add_argument("--naee-evaluations", type=int, default=32, help="NAEE candidate subsets evaluated")
    parser.add_argument("--compare-old", dest="compare_old", choices=("auto", "yes", "no"), default="auto",
                        help="also time the previous routes (eigh pseudo-inverse, eigh-clamp whitener, LAPACK SVD) "
                             "on one expert (auto: when I <= 4096)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma list of stage groups to run, in order (default all: {','.join(STAGES)})")
    parser.add_argument("--json", default=None, help="write all figures to this file")
    args = parser.parse_args(argv)
    quick(parser, args, argv, tokens=256, svd_experts=2)
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; choose from {', '.join(SHAPES)}")
    unknown = [s for s in args.stages.split(",") if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage group(s) {unknown}; choose from {', '.join(STAGES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible to torch here")
    args.torch_dtype = getattr(torch, args.dtype)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    print_provenance(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start_load = load_average()
    print(f"load average at start: {start_load}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    results = [run_shape(shape, args) for shape in args.shapes.split(",")]
    end_load = load_average()
    print(f"\nload average at end: {end_load}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"load_average": {"start": start_load, "end": end_load}, "shapes": results}, f, indent=1)


if __name__ == "__main__":
    main()
