"""moepress.distributed: single-process identity and a real 2-rank gloo all-reduce via torchrun."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import torch

from moepress import distributed


def test_single_process_helpers_are_identities():
    t = torch.arange(4, dtype=torch.float64)
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main_process()
    assert distributed.all_reduce_sum(t.clone()).equal(t)
    tree = distributed.all_reduce_tree({"a": t.clone(), "b": [t.clone(), 3]})
    assert tree["a"].equal(t) and tree["b"][0].equal(t) and tree["b"][1] == 3


def test_two_gloo_ranks_sum_through_torchrun(tmp_path):
    script = tmp_path / "reduce.py"
    script.write_text(textwrap.dedent("""
        import torch
        from moepress import distributed as d
        assert d.init_from_environment()
        t = {"x": torch.full((3,), float(d.rank() + 1), dtype=torch.float64)}
        d.all_reduce_tree(t)
        w = torch.tensor([float(d.rank())])
        d.broadcast_(w, src=1)
        print(f"rank{d.rank()} {t['x'].tolist()} {w.item()}", flush=True)
        d.shutdown()
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:  # a free port: concurrent test runs must not share a rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    proc = subprocess.run(torchrun + [str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for r in (0, 1):
        assert f"rank{r} [3.0, 3.0, 3.0] 1.0" in proc.stdout
