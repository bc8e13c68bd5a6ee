"""Data-parallel calibration through the real `torchrun` path: 2 gloo ranks on the CPU compress to
the same weights as 1 process.

Tolerance: 1e-5 relative (max |a - b| / max |b| per tensor). Ranks form the same batches as the
single process (batch size divides each rank's shard), so only the order of summation across
ranks differs; fp64 accumulators keep that far below the tolerance.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

import moepress

SETTINGS = dict(samples=8, seq_len=64, batch_size=2, seed=0)
METHOD_OPTIONS = {
    "reap": {},
    "naee": {"max_tokens": 300},  # the first 300 tokens span both ranks' shards (256 tokens each)
    "mergemoe": {},
    "d2moe": {"fisher_samples": 4},
    "hcsmoe": {},
}
RTOL = 1e-5


def _torchrun(args: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    with socket.socket() as sock:  # a free port: concurrent test runs must not share a rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=cwd)


def _assert_same_weights(single, parallel):
    """The saved checkpoints, reloaded (a streamed run writes the source's on-disk layout)."""
    a = moepress.load(single).state_dict()
    b = moepress.load(parallel).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        scale = a[key].abs().max().clamp_min(1e-12)
        assert (a[key] - b[key]).abs().max() / scale <= RTOL, key


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("mixtral")


def test_torchrun_cli_compress_equals_one_process(checkpoint, calib_file, tmp_path):
    """`torchrun -m moepress compress` (REAP, streamed layers: rank 0 owns the work directory)."""
    single = moepress.compress(str(checkpoint), "reap", 0.5, calib=str(calib_file), offload=False, **SETTINGS)
    single_dir = single.save(tmp_path / "single")
    out = tmp_path / "parallel"
    args = ["-m", "moepress", "compress", str(checkpoint), "--method", "reap", "--ratio", "0.5",
            "--calib", str(calib_file), "--samples", "8", "--seq-len", "64", "--batch-size", "2",
            "--out", str(out), "--quiet"]
    proc = _torchrun(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "moepress.json").read_text())
    assert record["world_size"] == 2 and record["offload"] is True
    assert record["calibration"]["sequences"] == 8  # the whole set is described, not one shard
    _assert_same_weights(single_dir, out)
    kept = {k: v["kept"] for k, v in record["layers"].items()}
    assert kept == {k: v["kept"] for k, v in single.record["layers"].items()}
    assert not any(tmp_path.glob(".parallel.work"))  # the work directory was handed over and removed


def test_two_ranks_equal_one_process_for_every_reducing_method(checkpoint, calib_file, tmp_path):
    """NAEE (candidate losses), MergeMoE (normal equations; and its routed / whole-layer fits),
    D²-MoE (Grams, Fisher), HC-SMoE (means), prune_refit (whole-layer fit and its error sums)."""
    runs = {name: (name, METHOD_OPTIONS[name]) for name in ["naee", "mergemoe", "d2moe", "hcsmoe"]}
    runs["mergemoe_routed"] = ("mergemoe", {"target": "routed"})
    runs["mergemoe_layer"] = ("mergemoe", {"target": "layer"})
    runs["prune_refit"] = ("prune_refit", {})
    script = tmp_path / "run_methods.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        import moepress
        for label, (method, options) in {runs!r}.items():
            result = moepress.compress({str(checkpoint)!r}, method, 0.5, calib={str(calib_file)!r}, offload=False,
                                       **{SETTINGS!r}, **options)
            result.save(sys.argv[1] + "/" + label)
    """))
    (tmp_path / "parallel").mkdir()
    proc = _torchrun([str(script), str(tmp_path / "parallel")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for label, (method, options) in runs.items():
        single = moepress.compress(str(checkpoint), method, 0.5, calib=str(calib_file), offload=False,
                                   **SETTINGS, **options)
        single_dir = single.save(tmp_path / "single" / label)
        parallel = tmp_path / "parallel" / label
        record = json.loads((parallel / "moepress.json").read_text())
        assert record["world_size"] == 2 and single.record["world_size"] == 1
        single_layers = json.loads((single_dir / "moepress.json").read_text())["layers"]
        for layer, entry in single_layers.items():  # same token counts: the union of the shards
            assert record["layers"][layer]["tokens"] == entry["tokens"] == 8 * 64
            for key in ("fit_tokens", "fit_rel_error", "refit_tokens", "routed_rel_error"):
                if key in entry:  # fits and their error sums are over the whole calibration set too
                    assert record["layers"][layer][key] == pytest.approx(entry[key], rel=RTOL), (label, key)
        _assert_same_weights(single_dir, parallel)
