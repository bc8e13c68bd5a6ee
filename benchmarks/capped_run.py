"""End-to-end compression of a real-width MoE under a memory cap smaller than its checkpoint (issue 10).

Writes a synthetic Qwen3-30B-A3B checkpoint (the real dimensions: hidden 2048, 128 experts of
768, top-8, 32 heads / 4 kv heads of 128, vocab 151936, untied embeddings; `--layers` decoder
layers, random bfloat16 weights) with `moepress.testing.synthetic.write_synthetic_checkpoint`, which
never holds more than one layer; then runs the CLI on it in a child process

    moepress compress CKPT --method reap --ratio 0.5 --samples 8 --seq-len 128 --out OUT

(offload auto = streaming) held to `--cap-gb` (default: 80% of the checkpoint's size), reloads
the output with `moepress.load` and checks its logits are finite.

How the cap is held: a watchdog thread reads the child's resident set (`VmRSS` in
/proc/PID/status, which counts the pages of memory-mapped checkpoint files it has touched as well
as its heap: stricter than a cgroup, which could reclaim those) every 20 ms and kills the child if
it exceeds the cap; the run then fails. With `--systemd` the child also runs in
`systemd-run --user --scope -p MemoryMax=CAP` when such a scope can be created (the kernel
enforces it; probed first, refused otherwise). `RLIMIT_AS` is not used: torch and safetensors
reserve far more address space than they touch. Peak RSS is the child's own `VmHWM`, written
at its exit (not `ru_maxrss`, which Linux carries across fork + exec from the parent), with the
watchdog's sampled peak and per-stage peaks from moepress.json beside it.

    .venv/bin/python benchmarks/capped_run.py [--layers 6] [--methods reap,mergemoe] [--cap-gb 6.5] [--keep]

Why 6 layers by default: the peak of a streamed REAP run is one decoder layer in float32 (the
compute dtype: 2.3 GiB at this width) + the kept experts' copy while the block is rebuilt (1.2 GiB
at ratio 0.5) + the input embeddings and the head as stored in bfloat16 (0.6 GiB each) + the
interpreter and libraries (~0.5 GiB), about 5.1 GiB whatever the depth; the bfloat16 checkpoint is
1.2 GiB + 1.2 GiB per layer (5.8 GiB for 4 layers, 8.1 GiB for 6): with 4 layers the margin
under a cap below the checkpoint's size would be thin.

The synthetic files are deleted at the end unless `--keep` (or `--root DIR` to put them somewhere).

`--quick`: the same steps on a tiny Qwen3-MoE of that family (2 layers, hidden 64, 8 experts of 32,
top-2, vocab 4096) under a 4 GiB cap (a tiny checkpoint is smaller than the interpreter itself, so
the cap is not below it), 4 x 32 calibration tokens: a smoke run of the watchdog, CLI and reload.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import print_provenance, quick

REPO = Path(__file__).resolve().parents[1]
QUICK_CONFIG = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
                    num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=0,
                    eos_token_id=0)

# The child: the moepress CLI itself, with its own high-water mark written at exit.
CHILD = r"""
import atexit, json, runpy, sys
hwm_file = sys.argv[1]
def _hwm():
    fields = dict(l.split(":", 1) for l in open("/proc/self/status"))
    json.dump({k: int(fields[k].split()[0]) for k in ("VmHWM", "VmRSS")}, open(hwm_file, "w"))
atexit.register(_hwm)
sys.argv = ["moepress"] + sys.argv[2:]
runpy.run_module("moepress", run_name="__main__")
"""


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def _descendants(pid: int) -> list[int]:
    """`pid` and its live descendants (a `systemd-run --scope` wrapper execs, torch may fork)."""
    found, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            children = []
        found += [int(c) for c in children]
        frontier += [int(c) for c in children]
    return found


def systemd_scope(cap: int) -> list[str] | None:
    """The `systemd-run` prefix that puts a command in a memory-capped scope, if one can be made here."""
    exe = shutil.which("systemd-run")
    if exe is None:
        return None
    prefix = [exe, "--user", "--scope", "--quiet", "-p", f"MemoryMax={cap}", "-p", "MemorySwapMax=0"]
    probe = subprocess.run(prefix + ["true"], capture_output=True, text=True)
    return prefix if probe.returncode == 0 else None


def run_capped(args: list[str], cap: int, log: Path, prefix: list[str] | None = None) -> dict:
    """Run the moepress CLI with `args` in a child held to `cap` bytes of RSS; returns its figures."""
    hwm_file = log.with_suffix(".hwm.json")
    cmd = (prefix or []) + [sys.executable, "-c", CHILD, str(hwm_file)] + args
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    killed = []

    def watch():
        while proc.poll() is None:
            total = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
            for pid in _descendants(proc.pid):
                st = _status(pid)
                for k in total:
                    total[k] += st.get(k, 0)
            for k in peak:
                peak[k] = max(peak[k], total[k])
            if total["VmRSS"] > cap and not killed:
                killed.append(total["VmRSS"])
                for pid in reversed(_descendants(proc.pid)):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    rc = proc.wait()
    thread.join()
    wall = time.perf_counter() - t0
    hwm = json.loads(hwm_file.read_text()) if hwm_file.exists() else {}
    return {"rc": rc, "wall_s": wall, "killed_at": killed[0] if killed else None,
            "peak_rss": hwm.get("VmHWM", 0) * 1024 or None, "sampled": peak}


def check_output(out: Path) -> str:
    """Reload the output with `moepress.load` (bf16, as stored) and run it on a few tokens."""
    code = (
        "import sys, torch, moepress\n"
        "m = moepress.load(sys.argv[1], dtype='auto')\n"
        "ids = torch.randint(0, m.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))\n"
        "with torch.no_grad():\n    logits = m(ids).logits\n"
        "fields = dict(l.split(':', 1) for l in open('/proc/self/status'))\n"
        "print(f'finite={bool(torch.isfinite(logits).all())} shape={tuple(logits.shape)} dtype={logits.dtype} '\n"
        "      f'experts/layer={m.config.num_experts} load_peak_rss_gib={int(fields[\"VmHWM\"].split()[0]) / 2**20:.2f}')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        return "RELOAD FAILED: " + res.stderr.strip().splitlines()[-1]
    return res.stdout.strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=6, help="decoder layers of the synthetic Qwen3-30B-A3B (real: 48)")
    ap.add_argument("--methods", default="reap", help="comma-separated moepress methods to run (e.g. reap,mergemoe)")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--cap-gb", type=float, default=None,
                    help="memory cap in GiB (default 80%% of the checkpoint's size on disk)")
    ap.add_argument("--systemd", action="store_true", help="also run in a systemd-run MemoryMax scope if possible")
    ap.add_argument("--opt", action="append", default=[], help="METHOD:NAME=VALUE, passed as --opt to that method")
    ap.add_argument("--root", type=Path, default=None, help="directory for the checkpoint and outputs (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and the outputs")
    ap.add_argument("--quick", action="store_true", help="a tiny Qwen3-MoE under a 4 GiB cap (smoke run)")
    args = ap.parse_args()
    print_provenance()
    quick(ap, args, layers=2, samples=4, seq_len=32, cap_gb=4.0)

    import torch

    from moepress.testing.synthetic import qwen3_30b_a3b_config, write_synthetic_checkpoint

    root = args.root or Path(tempfile.mkdtemp(prefix="moepress-capped-"))
    root.mkdir(parents=True, exist_ok=True)
    ckpt = root / f"qwen3-{'tiny' if args.quick else '30b-a3b'}-{args.layers}l"
    try:
        if ckpt.exists():
            print(f"reusing {ckpt}")
        else:
            t = time.perf_counter()
            config = qwen3_30b_a3b_config(args.layers, **(QUICK_CONFIG if args.quick else {}))
            write_synthetic_checkpoint(config, ckpt, dtype=torch.bfloat16, std=0.02,
                                       tokenizer_from=REPO / "src/moepress/zoo/assets/mixtral-ref")
            hwm = int(dict(l.split(":", 1) for l in open("/proc/self/status"))["VmHWM"].split()[0]) * 1024
            print(f"wrote {ckpt} in {time.perf_counter() - t:.1f} s (writer process peak RSS {gib(hwm)})")
        size = dir_size(ckpt)
        cap = int(args.cap_gb * 2**30) if args.cap_gb else int(0.80 * size)
        prefix = systemd_scope(cap) if args.systemd else None
        if args.systemd and prefix is None:
            print("systemd-run scope: not available here; the watchdog alone holds the cap")
        print(f"checkpoint: {gib(size)} on disk ({args.layers} layers, bfloat16); "
              f"cap: {gib(cap)} ({cap / size:.0%} of it), held by "
              f"{'systemd MemoryMax + ' if prefix else ''}an RSS watchdog")
        for method in args.methods.split(","):
            out = root / f"out-{method}"
            shutil.rmtree(out, ignore_errors=True)
            cli = ["compress", str(ckpt), "--method", method, "--ratio", str(args.ratio), "--samples",
                   str(args.samples), "--seq-len", str(args.seq_len), "--out", str(out)]
            for o in args.opt:
                if o.startswith(method + ":"):
                    cli += ["--opt", o.split(":", 1)[1]]
            print(f"\n$ moepress {' '.join(cli)}", flush=True)
            fig = run_capped(cli, cap, root / f"{method}.log", prefix)
            s = fig["sampled"]
            if fig["rc"] != 0:
                why = f"killed by the watchdog at RSS {gib(fig['killed_at'])}" if fig["killed_at"] else f"exit {fig['rc']}"
                tail = (root / f"{method}.log").read_text().strip().splitlines()[-5:]
                print(f"  FAILED ({why}) after {fig['wall_s']:.1f} s; sampled peak RSS {gib(s['VmRSS'])}")
                print("  " + "\n  ".join(tail))
                continue
            record = json.loads((out / "moepress.json").read_text())
            print(f"  wall {fig['wall_s']:.1f} s; peak RSS {gib(fig['peak_rss'])} (VmHWM) = "
                  f"{fig['peak_rss'] / size:.0%} of the checkpoint, {fig['peak_rss'] / cap:.0%} of the cap; "
                  f"sampled peak {gib(s['VmRSS'])} (anon {gib(s['RssAnon'])}, file-backed {gib(s['RssFile'])})")
            for name, st in (record.get("stages") or {}).items():
                extra = ", ".join(f"{k} {v}" for k, v in st.items())
                print(f"    stage {name}: {extra}")
            p = record.get("parameters", {})
            print(f"  output: {gib(dir_size(out))} on disk; parameters {p.get('before', {}).get('total')} -> "
                  f"{p.get('after', {}).get('total')}")
            print(f"  reload: {check_output(out)}")
    finally:
        if not args.keep:
            shutil.rmtree(root if args.root is None else ckpt, ignore_errors=True)
            if args.root is not None:
                for out in root.glob("out-*"):
                    shutil.rmtree(out, ignore_errors=True)
        else:
            print(f"kept {root}")


if __name__ == "__main__":
    main()
