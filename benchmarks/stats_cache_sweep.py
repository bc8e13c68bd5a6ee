"""Cost of a ratio sweep with the statistics cache and `--propagate original` (issue 11 item 1).

On the committed reference model (`moepress.zoo.reference_model_path("mixtral-ref")`), for one
method at ratios 0.25, 0.375, 0.5, 0.625 it measures the CALIBRATION part of compression:

- forwards: capturing layer 0's inputs, running decoder layers on the calibration hidden states,
  collecting MoE-block inputs (`pipeline.capture_layer_inputs`, `run_layer`, `collect_block_inputs`,
  `run_layer_collecting`);
- statistics: every statistic computed (`LayerStatistics.__getitem__`, the cache reads it makes
  counted as cache);
- fisher: D²-MoE's model-level Fisher (`fisher_bases`, in `prepare`);
- cache: weight hashing, cache look-ups, reads and writes (`run.cache_keys.PipelineCache`, `LayerCache`,
  `CachedLayers`, `weights_digest`), wherever they are called from.

It compares one run as today (no cache, `propagate="compressed"`) with the whole 4-ratio sweep
on a fresh cache with `propagate="original"`, and prints sweep / one run (goal <= 1.3). The
method's own decision (sorting scores, solving) is not calibration and is reported apart.
The functions are timed by `_common.CallTimer` (observed with `sys.setprofile`, not patched).

    PYTHONPATH=src python benchmarks/stats_cache_sweep.py [--methods reap,frequency,d2moe,mergemoe] \
        [--samples 64] [--seq-len 256] [--threads 1] [--repeat 3]

`--quick`: d2moe (it has every category: forwards, statistics, Fisher, cache), 4 x 64 calibration
tokens, one repetition (a smoke run).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from _common import CallTimer, print_provenance, quick

import moepress
from moepress.run import cache_keys, pipeline
from moepress.calib import LayerStatistics
from moepress.methods.d2moe.fisher import fisher_bases
from moepress.zoo import reference_model_path

RATIOS = (0.25, 0.375, 0.5, 0.625)


def calibration_clock() -> CallTimer:
    """CPU seconds of the process per category of the outermost timed call (nested timed calls are
    not counted twice; cache calls count as cache wherever they are made, e.g. a statistic read
    from the cache). CPU time, not wall time: the machine is shared (2 cores, several jobs), so
    the figure is what the calibration costs, not how busy the neighbours were."""
    cache = cache_keys.PipelineCache, cache_keys.LayerCache
    return CallTimer({
        "forwards": [getattr(pipeline, name) for name in
                     ("capture_layer_inputs", "run_layer", "collect_block_inputs", "run_layer_collecting")],
        "statistics": LayerStatistics.__getitem__,  # every statistic a method reads, computed or read from the cache
        "cache": [cache[0].inputs_needed, cache[0].onloaded, cache[0].propagated, cache[1].load, cache[1].save,
                  cache_keys.CachedLayers.__getitem__, cache_keys.weights_digest],
        "fisher": fisher_bases,  # D²-MoE's model-level Fisher (prepare)
    }, clock=time.process_time, carve_out={"cache"})


def run(model, method, ratio, clock: CallTimer, **kwargs):
    t0 = time.perf_counter()
    with clock:
        result = moepress.compress(model, method, ratio, offload=False, **kwargs)
    wall = result.record["stages"]["compress"]["seconds"]
    return result, wall, time.perf_counter() - t0


def fmt(clock: CallTimer) -> str:
    parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(clock.seconds.items()))
    return f"{clock.total:.2f} CPU s ({parts}; {clock.wall:.2f} s wall)"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="reap,frequency,mergemoe")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3, help="measure each side this many times, keep the "
                        "fastest (the machine is shared: the minimum is the least disturbed)")
    parser.add_argument("--quick", action="store_true", help="every category, tiny calibration, once (smoke run)")
    args = parser.parse_args()
    print_provenance()
    quick(parser, args, methods="d2moe", samples=4, seq_len=64, repeat=1)
    torch.set_num_threads(args.threads)
    model = reference_model_path("mixtral-ref")
    common = dict(samples=args.samples, seq_len=args.seq_len, device="cpu")
    print(f"model {model.name}, {args.samples} x {args.seq_len} calibration tokens, {args.threads} thread(s), "
          f"ratios {', '.join(map(str, RATIOS))}")
    moepress.compress(model, "frequency", 0.5, offload=False, stats_cache=False, **common)  # warm-up
    for method in args.methods.split(","):
        ones, originals, sweeps = [], [], []
        for _ in range(args.repeat):
            one = calibration_clock()
            _, one_wall, _ = run(model, method, 0.5, one, stats_cache=False, **common)
            ones.append((one.total, one, one_wall))
            original = calibration_clock()
            _, original_wall, _ = run(model, method, 0.5, original, stats_cache=False, propagate="original", **common)
            originals.append((original.total, original, original_wall))
            with tempfile.TemporaryDirectory(prefix="moepress-sweep-cache-") as directory:
                sweep = calibration_clock()
                sweep_wall, hits, misses, propagated = 0.0, 0, 0, []
                for ratio in RATIOS:
                    result, wall, _ = run(model, method, ratio, sweep, stats_cache=directory, propagate="original",
                                          **common)
                    sweep_wall += wall
                    info = result.record["stats_cache"]
                    hits, misses = hits + info["hits"], misses + info["misses"]
                    propagated.append(info["inputs_propagated"])
            sweeps.append((sweep.total, sweep, sweep_wall))
        _, one, one_wall = min(ones, key=lambda t: t[0])
        _, original, original_wall = min(originals, key=lambda t: t[0])
        _, sweep, sweep_wall = min(sweeps, key=lambda t: t[0])
        print(f"\n{method} (fastest of {args.repeat}; all totals: one run "
              f"{[round(t[0], 2) for t in ones]}, sweep {[round(t[0], 2) for t in sweeps]}):")
        print(f"  one run, no cache, compressed propagation: calibration {fmt(one)}; compress stage {one_wall:.2f} s "
              f"wall")
        print(f"  one run, no cache, original propagation: calibration {fmt(original)}; compress stage "
              f"{original_wall:.2f} s wall")
        print(f"  4-ratio sweep, fresh cache, original propagation: calibration {fmt(sweep)}; compress stages "
              f"{sweep_wall:.2f} s wall; cache hits {hits}, misses {misses}; inputs propagated per run {propagated}")
        print(f"  sweep calibration / one run's calibration = {sweep.total / one.total:.2f}x (goal <= 1.3x); "
              f"/ one original-propagation run's = {sweep.total / original.total:.2f}x")


if __name__ == "__main__":
    main()
