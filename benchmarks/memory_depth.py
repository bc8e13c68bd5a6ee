"""Peak memory of a compression run vs model depth (issue 2): 4-layer vs 16-layer, equal width.

Each run is a fresh subprocess so its peak RSS is its own. With `--offload` (the bounded-memory
path) the 16-layer peak should stay within 15% of the 4-layer one; without it, it grows with depth.

    .venv/bin/python benchmarks/memory_depth.py [--hidden 512 --intermediate 1536 --method frequency]
        [--depths 4,16] [--quick]

`--quick`: hidden 64, intermediate 96, 2 vs 4 layers, 4 x 64 calibration tokens (a smoke run).
Models and outputs live in a temp dir removed at the end.

Any registered method works; `--method d2moe` also measures its Fisher pass (a forward and a
backward walk over the original layers, one layer resident at a time).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import print_provenance, quick

CHILD = r"""
import json, sys, time, torch, moepress
src, calib, method, offload, out, samples, seq_len = sys.argv[1:8]
t = time.perf_counter()
r = moepress.compress(src, method, 0.5, calib=calib, samples=int(samples), seq_len=int(seq_len),
                      offload=(out + "-work") if offload == "1" else False)
r.save(out)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so it would include the parent's
# memory at fork time (the parent built the source model).
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"peak_rss_mb": int(hwm) / 1024,
                  "seconds": time.perf_counter() - t}))
"""


def build(path: Path, layers: int, hidden: int, intermediate: int) -> float:
    import torch
    import transformers

    from moepress.testing import tiny_config

    cfg = tiny_config("mixtral", num_layers=layers, hidden_size=hidden, intermediate_size=intermediate,
                      num_attention_heads=8, num_key_value_heads=4)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 3:
                p.normal_(0, 0.02)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters()) * 4 / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--method", default="frequency")
    ap.add_argument("--offload-only", action="store_true", help="skip the in-memory comparison runs")
    ap.add_argument("--depths", default="4,16", help="the two decoder-layer counts compared")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="tiny width, 2 vs 4 layers, tiny calibration (smoke run)")
    args = ap.parse_args()
    print_provenance()
    quick(ap, args, hidden=64, intermediate=96, depths="2,4", samples=4, seq_len=64)
    with tempfile.TemporaryDirectory(prefix="moepress-mem-") as root:
        measure(Path(root), args)


def measure(root: Path, args) -> None:
    shallow, deep = (int(d) for d in args.depths.split(","))
    calib = root / "calib.txt"
    import inspect
    import json as _json

    calib.write_text(inspect.getsource(_json) * 20)
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator([calib.read_text()], trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"]))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    rows = []
    for layers in (shallow, deep):
        src = root / f"mixtral-{layers}"
        size = build(src, layers, args.hidden, args.intermediate)
        hf.save_pretrained(src)
        for offload in ("1",) if args.offload_only else ("1", "0"):
            out = root / f"out-{layers}-{offload}"
            res = subprocess.run([sys.executable, "-c", CHILD, str(src), str(calib), args.method, offload, str(out),
                                  str(args.samples), str(args.seq_len)], capture_output=True, text=True)
            if res.returncode != 0:
                raise SystemExit(f"compression child failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
            fig = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append((layers, size, offload == "1", fig["peak_rss_mb"], fig["seconds"]))
            print(f"layers={layers:2d} model={size:7.1f} MB offload={offload == '1'!s:5} "
                  f"peak_rss={fig['peak_rss_mb']:7.1f} MB time={fig['seconds']:.1f} s", flush=True)
    peak = {(r[0], r[2]): r[3] for r in rows}
    print(f"offload: {deep}-layer peak / {shallow}-layer peak = {peak[(deep, True)] / peak[(shallow, True)]:.3f} "
          f"(target <= 1.15)")
    if not args.offload_only:
        print(f"in memory: {deep}-layer peak / {shallow}-layer peak = {peak[(deep, False)] / peak[(shallow, False)]:.3f}")


if __name__ == "__main__":
    main()
