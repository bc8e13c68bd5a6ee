"""Wall time of one `mergemoe` layer at Mixtral-8x7B size, and the GEMM efficiency of its heavy stages.

    .venv/bin/python benchmarks/mergemoe_layer_time.py [--tokens 4096] [--hidden 4096] [--intermediate 14336]

One Mixtral MoE block (8 experts, top-2; random N(0, 0.02) weights, fp32) is merged 8 -> 4 with the
default MergeMoE config on `--tokens` random calibration tokens. Stages are the functions MergeMoE
calls, timed from outside by `_common.CallTimer` (observed, not patched; one run, no repetition).
The fp32 GEMM throughput of this machine is measured first (square matmuls of --gemm-size); the
fit stage's FLOPs are counted from the routed token counts: per cluster, merged gate+up (4·t·H·I)
and each member's gate+up+down (6·t·H·I).
Memory: ~6 GB for the experts + ~3 GB for the merged block; ~minutes of CPU.

`--quick`: H 128, I 448, 512 tokens in batches of 128, GEMM peak at 256 (every stage, seconds).
"""

from __future__ import annotations

import argparse
import resource
import time
import warnings

import torch
import transformers
from _common import CallTimer, gemm_gflops, print_provenance, quick

from moepress.arch import FAMILIES, MoELayerView
from moepress.calib.stats import LayerStatistics
from moepress.methods import LayerContext, build_method
from moepress.methods import merging_common
from moepress.methods.mergemoe import method as mergemoe_method
from moepress.ops import least_squares

# the functions MergeMoE's compress_layer calls, by the label of their stage
STAGES = {
    "clustering (weight Gram)": merging_common.weight_similarity,
    "gate/up/down weighted average": merging_common.average_experts,
    "fit: P and Y_tgt over tokens": mergemoe_method.down_projection_equations,
    "solve": least_squares.NormalEquations.solve,
    "build remapped block": merging_common.build_remap_block,
    "calibration error (2 block forwards)": merging_common.layer_relative_error,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--merged", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--gemm-size", type=int, default=2048)
    parser.add_argument("--quick", action="store_true", help="H 128, I 448, 512 tokens (smoke run)")
    args = parser.parse_args()
    print_provenance()
    quick(parser, args, hidden=128, intermediate=448, tokens=512, batch=128, gemm_size=256)
    h, i = args.hidden, args.intermediate

    fp32 = gemm_gflops(args.gemm_size, repeats=3)
    fp64 = gemm_gflops(args.gemm_size, torch.float64, repeats=3)
    print(f"threads {torch.get_num_threads()}; GEMM {args.gemm_size}^3: fp32 {fp32:.1f} GFLOP/s, fp64 {fp64:.1f} GFLOP/s")

    config = transformers.MixtralConfig(hidden_size=h, intermediate_size=i, num_local_experts=args.experts,
                                        num_experts_per_tok=2, num_hidden_layers=1, vocab_size=128)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    block = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    config._experts_implementation = "eager"
    view = MoELayerView(block, FAMILIES["mixtral"], config, 0)
    batches = [torch.randn(args.batch, h) for _ in range(args.tokens // args.batch)]
    print(f"block built in {time.perf_counter() - t0:.1f} s: {args.experts} experts, H={h}, I={i}; "
          f"{args.tokens} tokens; merging to {args.merged}")

    timer = CallTimer(STAGES)
    stats = LayerStatistics(view, batches)
    method = build_method("mergemoe", experts=args.merged)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught, timer:
        warnings.simplefilter("always")
        result = method.compress_layer(LayerContext(view, stats, 0, 1))
    total = time.perf_counter() - t0
    for label in STAGES:
        print(f"  {label:<40} {timer.seconds[label]:8.1f} s  ({timer.calls[label]} calls)")
    print(f"  {'total compress_layer':<40} {total:8.1f} s")
    fit_tokens = result.record["fit_tokens"]
    groups = result.record["groups"]
    flops = sum(int(t) * (4 + 6 * len(groups[int(c)])) * h * i for c, t in fit_tokens.items())
    fit_s = max(timer.seconds["fit: P and Y_tgt over tokens"], 1e-9)
    print(f"groups {groups}; fit tokens per cluster {fit_tokens}; warnings: {len(caught)} "
          f"({caught[0].message if caught else ''})"[:400])
    print(f"fit stage: {flops / 1e12:.2f} TFLOP in {fit_s:.1f} s = {flops / fit_s / 1e9:.1f} GFLOP/s "
          f"= {100 * flops / fit_s / 1e9 / fp32:.0f}% of measured fp32 GEMM")
    print(f"calibration relative error of the merged layer: {result.record['calib_rel_error']:.4f}; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f} GB")


if __name__ == "__main__":
    main()
