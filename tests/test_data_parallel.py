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
from moepress.methods import available_methods

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


def test_two_ranks_equal_one_process_for_method_variants(checkpoint, calib_file, tmp_path):
    """Resident runs (offload=False) of MergeMoE's routed / whole-layer fits and D²-MoE's Fisher; every
    method's default run, streamed, is in the table below."""
    runs = {"d2moe": ("d2moe", METHOD_OPTIONS["d2moe"])}
    runs["mergemoe_routed"] = ("mergemoe", {"target": "routed"})
    runs["mergemoe_layer"] = ("mergemoe", {"target": "layer"})
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


# ---------------------------------------------------------------------------------------------------
# The table: every registered method x three shapes, 2 ranks vs 1 process, reloaded checkpoints compared
# on their reconstructed expert weights (a low-rank factorisation is unique only up to sign and basis)
# and on their logits. Offload is the API default ("auto": streamed where the method allows it), so
# the shared work directory of the ranks is exercised.

# (family, overrides, calibration settings, label). Shapes that broke D²-MoE before (issue 25): 6
# experts of width 72 at hidden 48; odd expert counts, widths that are no power of two (an odd
# width fails in transformers' own grouped_mm experts: rows must be 16-byte aligned); a rank's shard smaller than one
# batch and shards that are not multiples of the batch size.
SHAPES = {
    "mixtral_e6_w72": ("mixtral", dict(hidden_size=48, intermediate_size=72, num_local_experts=6),
                       dict(samples=8, seq_len=16, batch_size=4)),
    "qwen3_e7_w44": ("qwen3_moe", dict(hidden_size=48, moe_intermediate_size=44, num_experts=7, head_dim=12),
                     dict(samples=5, seq_len=16, batch_size=2)),
    "olmoe_e5_small_shards": ("olmoe", dict(hidden_size=48, intermediate_size=36, num_experts=5),
                              dict(samples=3, seq_len=16, batch_size=4)),
}
TABLE_OPTIONS = {
    "mergemoe": {"tokens": "all"},  # full-rank least squares on tiny calibration (test_registry_table)
    "naee": {"max_tokens": 40},  # spans both ranks' shards
    "d2moe": {"fisher_batch_size": 2},  # Fisher batches that straddle the ranks' shards
}


def _reconstructed(state: dict) -> dict:
    """A checkpoint's tensors with low-rank factors replaced by the weights they make, which are
    unique where the factors are not: D²-MoE's `base + U V` per expert (gate, up, down) and MoE-I²'s
    `U V` per expert projection."""
    out = dict(state)
    for key in [k for k in state if k.endswith(".gate_u") and k[:-len("gate_u")] + "gate_up_v" in state]:
        p = key[: -len("gate_u")]
        gu, uu, v, du, dv = (out.pop(p + n) for n in ("gate_u", "up_u", "gate_up_v", "down_u", "down_v"))
        base_gu, base_d = out.pop(p + "base_gate_up"), out.pop(p + "base_down")
        i, rg = gu.shape[1], gu.shape[2]
        out[p + "expert_gate"] = base_gu[:i] + gu @ v[:, :rg]
        out[p + "expert_up"] = base_gu[i:] + uu @ v[:, rg:]
        out[p + "expert_down"] = base_d + du @ dv
    for key in [k for k in out if k.endswith("_u") and k[:-2] + "_v" in state]:  # MoE-I²
        out[key[:-2] + "_weight"] = out.pop(key) @ out.pop(key[:-2] + "_v")
    return out


@pytest.fixture(scope="module")
def shape_checkpoints(tmp_path_factory, tokenizer):
    from moepress.testing import tiny_model

    paths = {}
    for label, (family, overrides, _) in SHAPES.items():
        path = tmp_path_factory.mktemp(label)
        tiny_model(family, **overrides).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[label] = str(path)
    return paths


@pytest.fixture(scope="module")
def parallel_table(shape_checkpoints, calib_file, tmp_path_factory):
    """Every (shape, method) compressed once under `torchrun --nproc_per_node=2` (one launch)."""
    out = tmp_path_factory.mktemp("parallel-table")
    runs = {f"{label}/{method}": (shape_checkpoints[label], method, {**SHAPES[label][2], **TABLE_OPTIONS.get(method, {})})
            for label in SHAPES for method in METHODS}
    script = out / "run_table.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        import moepress
        for label, (path, method, options) in {runs!r}.items():
            ratio = options.pop("ratio", 0.5)
            result = moepress.compress(path, method, ratio, calib={str(calib_file)!r}, seed=0, **options)
            result.save(sys.argv[1] + "/" + label)
    """))
    proc = _torchrun([str(script), str(out)], out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


METHODS = tuple(available_methods())


@pytest.mark.parametrize("label", list(SHAPES))
@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_two_ranks_equals_one_process(method, label, shape_checkpoints, parallel_table,
                                                     calib_file, tmp_path):
    options = {**SHAPES[label][2], **TABLE_OPTIONS.get(method, {})}
    single = moepress.compress(shape_checkpoints[label], method, options.pop("ratio", 0.5), calib=str(calib_file),
                               seed=0, **options)
    single_dir = single.save(tmp_path / "single")
    parallel_dir = parallel_table / label / method
    record = json.loads((parallel_dir / "moepress.json").read_text())
    assert record["world_size"] == 2 and single.record["world_size"] == 1
    expected = json.loads(json.dumps(single.record))  # as saved (JSON keys are strings)
    for layer, entry in expected["layers"].items():  # counts and fit errors: over the whole set
        for key in ("tokens", "fit_tokens", "fit_rel_error", "refit_tokens", "routed_rel_error", "calib_rel_error"):
            if key in entry:  # abs: a fit that is exact on tiny calibration leaves rounding noise only
                assert record["layers"][layer][key] == pytest.approx(entry[key], rel=RTOL, abs=1e-6), (layer, key)
    a = _reconstructed(moepress.load(single_dir).state_dict())
    b = _reconstructed(moepress.load(parallel_dir).state_dict())
    assert a.keys() == b.keys()
    for key in a:
        scale = a[key].abs().max().clamp_min(1e-12)
        assert (a[key] - b[key]).abs().max() / scale <= RTOL, key
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        la = moepress.load(single_dir)(ids).logits
        lb = moepress.load(parallel_dir)(ids).logits
    assert (la - lb).abs().max() / la.abs().max() <= RTOL
