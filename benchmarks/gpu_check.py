"""The GPU path proven in one command: a report of everything moepress does on a CUDA device (issue 22).

On a GPU box with its own torch and transformers and no network, from a clone of the repository
(nothing to install):

    PYTHONPATH=src python benchmarks/gpu_check.py --out gpu-report            # part limits: < 8 min in all
    PYTHONPATH=src python benchmarks/gpu_check.py --out r --device cpu --quick  # the CI smoke run

writes `gpu-report/report.md` (what to read or paste) and `gpu-report/report.json` (every figure),
plus each part's own output (`PART.json`, `PART.log`). Parts, each in its own child process with
its own time limit, so that one failure or hang is reported and the others still run:

- `env`: python, torch (+ CUDA, cuDNN), transformers, the GPU's name and memory, where moepress was
  imported from (the source tree) and the bf16 / fp32 GEMM rate measured on the device.
- `methods`: every registered method on the built-in reference (`mixtral-ref`) with `--device` and
  with `--device cpu`, same seed and calibration: seconds of both, the largest relative weight
  difference between the two results (per tensor `max|a - b| / max|a|`, the worst tensor), held-out
  perplexity of both (scored on `--device`).
- `layer_speed`: `benchmarks/layer_speed.py --device DEVICE` on the Mixtral-8x7B and Qwen3-30B-A3B
  layer shapes in bfloat16 (each stage's fraction of the GEMM peak measured in the same run, peak
  device memory).
- `capped`: a synthetic Qwen3-30B-A3B checkpoint (real widths, `--capped-layers` decoder layers,
  bfloat16) compressed on the device by reap, mergemoe and d2moe: seconds per layer (the record's
  per-layer `seconds`), wall time and peak device memory (`torch.cuda.max_memory_allocated`).
- `finetune`: a few optimizer steps of Compressed Experts fine-tuning on the device (loss first and
  last, seconds per step).

`--quick`: the same parts at smoke sizes (a tiny random Mixtral, 2 x 16 calibration tokens, layer
shapes shrunk by `layer_speed --quick`, a tiny Qwen3-MoE and reap alone in `capped`, 2 fine-tune
steps), each in this process (no child per part); with `--device cpu --quick` it is a test in CI
(tests/test_benchmarks_quick.py), so it cannot rot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from _common import REPO, gemm_gflops, print_provenance, versions
from _common import sync as _sync

PARTS = ("env", "methods", "layer_speed", "capped", "finetune")
#: seconds each part may take: full run (~8 min in all at most), --quick (a loaded 2-core CPU)
LIMITS = {"env": 60, "methods": 200, "layer_speed": 150, "capped": 150, "finetune": 60}
QUICK_LIMITS = {"env": 60, "methods": 150, "layer_speed": 90, "capped": 90, "finetune": 60}
CAPPED_METHODS = ("reap", "mergemoe", "d2moe")
QWEN3_TINY = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
                  num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=0,
                  eos_token_id=0)


# ---------------------------------------------------------------- the parts (each in a child process)
def _reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.startswith("cuda") else None


def part_env(args) -> dict:
    import torch
    import transformers

    import moepress

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
           "moepress": getattr(moepress, "__version__", "-"), "moepress_file": moepress.__file__,
           "from_source_tree": str(REPO / "src") in moepress.__file__, "cuda_available": torch.cuda.is_available(),
           "torch_cuda": torch.version.cuda, "device": args.device, "cpu_threads": torch.get_num_threads()}
    if args.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(args.device)
        out.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version(),
                   gpus_visible=torch.cuda.device_count())
    n = 512 if args.quick else 8192
    out["gemm_tflops"] = {name: round(gemm_gflops(n, getattr(torch, name), args.device) / 1e3, 3)
                          for name in ("bfloat16", "float32")}
    out["gemm_size"] = n
    return out


def _reference(args) -> str:
    if args.quick:
        from _common import quick_model

        return str(quick_model())
    from moepress.zoo import reference_model_path

    return str(reference_model_path("mixtral-ref"))


def _heldout_file(folder: str, chars: int) -> str:
    from moepress.zoo import builtin_domains, builtin_text

    text = "\n\n".join(builtin_text(f"heldout:{d}") for d in builtin_domains())
    path = Path(folder) / "heldout.txt"
    path.write_text(text[:chars] if chars else text)
    return str(path)


def _max_rel_diff(a: dict, b: dict) -> tuple[float, str]:
    worst, name = 0.0, ""
    for key in a:
        x, y = a[key].float().cpu(), b[key].float().cpu()
        rel = float((x - y).abs().max() / x.abs().max().clamp_min(1e-12)) if x.numel() else 0.0
        if rel > worst:
            worst, name = rel, key
    return worst, name


def part_methods(args) -> dict:
    import torch

    import moepress
    from moepress.methods import available_methods

    path = _reference(args)
    methods = args.methods.split(",") if args.methods else list(available_methods())
    settings = dict(samples=2 if args.quick else 32, seq_len=16 if args.quick else 256, seed=0, stats_cache=False)
    heldout = _heldout_file(args.out, 4000 if args.quick else 0)
    eval_len = 32 if args.quick else 256
    deadline = time.perf_counter() + args.limit - 20
    rows = {}
    for method in methods:
        if time.perf_counter() > deadline:
            rows[method] = {"error": "not run: the part's time limit was reached"}
            continue
        row = {}
        try:
            results = {}
            for device in dict.fromkeys([args.device, "cpu"]):  # one run when --device is the CPU
                _reset_peak(device)
                t = time.perf_counter()
                results[device] = moepress.compress(path, method, 0.5, device=device, offload=False, **settings)
                _sync(device)
                row[f"seconds_{device.split(':')[0]}"] = round(time.perf_counter() - t, 3)
                row[f"peak_gb_{device.split(':')[0]}"] = _peak_gb(device)
            states = {d: r.model.state_dict() for d, r in results.items()}
            row["max_rel_weight_diff"], row["worst_tensor"] = _max_rel_diff(states["cpu"], states[args.device])
            for device, result in results.items():
                report = moepress.evaluate(result.model, tokenizer=path, ppl=[heldout], seq_len=eval_len,
                                           device=args.device)
                row[f"ppl_{device.split(':')[0]}"] = round(next(v for k, v in report.metrics.items()
                                                                if k.startswith("ppl/")), 4)
            del results, states
        except Exception as exc:  # reported; the next method still runs
            row["error"] = f"{type(exc).__name__}: {exc}"
            row["traceback"] = traceback.format_exc(limit=6)
        rows[method] = row
        _write_part(args, "methods", {"rows": rows, "error": "incomplete"})  # kept if the part is stopped
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        print(method, json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
    out = {"model": "tiny random mixtral" if args.quick else "mixtral-ref", "settings": settings, "rows": rows}
    failed = [m for m, r in rows.items() if "error" in r]
    if failed:
        out["error"] = f"{len(failed)} of {len(rows)} methods failed: {', '.join(failed)}"
    return out


def part_layer_speed(args) -> dict:
    out_json = Path(args.out) / "layer_speed.raw.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "layer_speed.py"), "--device", args.device,
           "--shapes", "mixtral,qwen3", "--json", str(out_json)]
    cmd += ["--quick"] if args.quick else ["--dtype", "bfloat16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(), timeout=args.limit - 10)
    (Path(args.out) / "layer_speed.stdout.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"layer_speed.py exited {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1]}")
    data = json.loads(out_json.read_text())
    shapes = []
    for shape in data["shapes"]:
        shapes.append({k: shape[k] for k in ("shape", "hidden", "intermediate", "experts", "top_k", "tokens", "dtype",
                                             "device", "gemm_peak_gflops")}
                      | {"stages": [{k: s.get(k) for k in ("stage", "seconds", "peak_fraction", "gemm_bound",
                                                             "peak_cuda_gb", "peak_rss_gb")}
                                    for s in shape["stages"]]})
    return {"command": " ".join(cmd[1:]), "shapes": shapes}


CAPPED_CHILD = r"""
import json, sys, time, torch, moepress
path, method, device, samples, seq_len = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
if device.startswith("cuda"):
    torch.cuda.reset_peak_memory_stats(device)
t = time.perf_counter()
result = moepress.compress(path, method, 0.5, device=device, dtype="bfloat16", samples=samples, seq_len=seq_len,
                           seed=0, stats_cache=False, out=sys.argv[6])
result.save()
seconds = time.perf_counter() - t
layers = [r.get("seconds") for r in (result.records.values() if isinstance(result.records, dict) else result.records)
          if isinstance(r, dict)]
peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.startswith("cuda") else None
fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
print("RESULT " + json.dumps({"seconds": seconds, "layer_seconds": layers, "peak_device_gb": peak,
                              "peak_rss_gb": int(fields["VmHWM"].split()[0]) / 2**20}))
"""


def part_capped(args) -> dict:
    import torch

    from moepress.testing.synthetic import qwen3_30b_a3b_config, write_synthetic_checkpoint

    layers = 2 if args.quick else args.capped_layers
    config = qwen3_30b_a3b_config(layers, **(QWEN3_TINY if args.quick else {}))
    samples, seq_len = (4, 32) if args.quick else (8, 128)
    deadline = time.perf_counter() + args.limit - 10
    with tempfile.TemporaryDirectory(prefix="moepress-gpu-capped-", dir=args.scratch) as tmp:
        src = Path(tmp) / "qwen3-30b-a3b-synthetic"
        t = time.perf_counter()
        size = write_synthetic_checkpoint(config, src, dtype=torch.bfloat16,  # its tokenizer: the built-in one
                                          tokenizer_from=REPO / "src/moepress/zoo/assets/mixtral-ref")
        rows = {"checkpoint": {"layers": layers, "bytes": size, "write_seconds": round(time.perf_counter() - t, 1),
                               "calibration": f"{samples} x {seq_len}"}}
        for method in CAPPED_METHODS[:1] if args.quick else CAPPED_METHODS:
            left = deadline - time.perf_counter()
            if left < 15:
                rows[method] = {"error": "not run: the part's time limit was reached"}
                continue
            cmd = [sys.executable, "-c", CAPPED_CHILD, str(src), method, args.device, str(samples), str(seq_len),
                   str(Path(tmp) / f"out-{method}")]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(), timeout=left)
                lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                rows[method] = (json.loads(lines[-1][7:]) if proc.returncode == 0 and lines else
                                {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]})
            except subprocess.TimeoutExpired:
                rows[method] = {"error": f"timed out after {left:.0f} s"}
            print(method, json.dumps(rows[method]), flush=True)
    shape = "tiny Qwen3-MoE" if args.quick else "Qwen3-30B-A3B widths (hidden 2048, 128 experts of 768, top-8)"
    out = {"shape": shape, "rows": rows}
    failed = [m for m in (CAPPED_METHODS[:1] if args.quick else CAPPED_METHODS)
              if "error" in rows.get(m, {"error": "not run"})]
    if failed:
        out["error"] = f"failed: {', '.join(failed)}"
    return out


def part_finetune(args) -> dict:
    import torch

    import moepress
    from moepress.methods.compressed_experts.finetune import FinetuneConfig, finetune

    path = _reference(args)
    result = moepress.compress(path, "compressed_experts", 0.5, samples=4 if args.quick else 32,
                               seq_len=32 if args.quick else 256, seed=0, stats_cache=False, offload=False)
    model = result.model.float().to(args.device)
    ids = torch.randint(2, model.config.vocab_size, (16, 32 if args.quick else 256),
                        generator=torch.Generator().manual_seed(0))
    steps = 2 if args.quick else 20
    config = FinetuneConfig(steps=steps, batch_size=4 if args.quick else 8)
    _reset_peak(args.device)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="moepress-gpu-ft-") as state:
        out = finetune(model, ids, config, state_dir=Path(state) / "state", progress=False)
    _sync(args.device)
    seconds = time.perf_counter() - t
    losses = list(out.losses)
    return {"steps": steps, "batch": config.batch_size, "seconds": round(seconds, 3),
            "seconds_per_step": round(seconds / steps, 4), "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None, "peak_device_gb": _peak_gb(args.device),
            "finite": all(math.isfinite(x) for x in losses) if losses else None}


PART_FUNCTIONS = {"env": part_env, "methods": part_methods, "layer_speed": part_layer_speed, "capped": part_capped,
                  "finetune": part_finetune}


def _write_part(args, name: str, data: dict) -> None:
    path = Path(args.out) / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


# ---------------------------------------------------------------- the parent: children, report
def _child_env() -> dict:
    src = str(REPO / "src")
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": src + (os.pathsep + path if path else ""), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def run_part(name: str, args) -> dict:
    """Run one part in a child process within its time limit; its JSON, or the error. `--quick`
    runs it in this process instead (no interpreter start per part; no time limit)."""
    limit = (QUICK_LIMITS if args.quick else LIMITS)[name]
    out = Path(args.out)
    if args.quick:
        args.limit = limit
        t = time.perf_counter()
        try:
            data = PART_FUNCTIONS[name](args)
        except Exception as exc:
            data = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=8)}
        _write_part(args, name, data)
        data["part_seconds"] = round(time.perf_counter() - t, 1)
        return data
    cmd = [sys.executable, __file__, "--child", name, "--out", str(out), "--device", args.device,
           "--limit", str(limit), "--capped-layers", str(args.capped_layers)]
    cmd += ["--quick"] if args.quick else []
    cmd += ["--methods", args.methods] if args.methods else []
    cmd += ["--scratch", args.scratch] if args.scratch else []
    (out / f"{name}.json").unlink(missing_ok=True)  # never a previous run's figures
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(), timeout=limit)
        (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
        data = json.loads((out / f"{name}.json").read_text()) if (out / f"{name}.json").exists() else None
        if proc.returncode != 0 or data is None:
            tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            data = {"error": f"exit {proc.returncode}: {tail}", **(data or {})}
    except subprocess.TimeoutExpired as exc:
        (out / f"{name}.log").write_text(str(exc.stdout or "") + str(exc.stderr or ""))
        partial = json.loads((out / f"{name}.json").read_text()) if (out / f"{name}.json").exists() else {}
        data = {**partial, "error": f"timed out after {limit} s"}
    data["part_seconds"] = round(time.perf_counter() - t, 1)
    return data


def _fmt(value, digits=3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-2 else f"{value:.{digits}f}"
    return str(value)


def markdown(report: dict) -> str:
    device = report["args"]["device"]
    short = device.split(":")[0]
    lines = [f"# moepress GPU check ({'quick, ' if report['args']['quick'] else ''}device {device})", "",
             f"`{report['command']}`", "", f"versions: {report['versions']}", ""]
    env = report["parts"].get("env", {})
    lines += ["## Environment", ""]
    lines += [f"- {k}: {v}" for k, v in env.items() if k not in ("part_seconds",)] + [""]
    methods = report["parts"].get("methods", {})
    lines += ["## Every method, device vs CPU", ""]
    if "rows" in methods:
        lines += [f"{methods['model']}, ratio 0.5, calibration {methods['settings']['samples']} x "
                  f"{methods['settings']['seq_len']}; perplexity of held-out text scored on {device}", "",
                  f"| method | s {short} | s cpu | max rel weight diff | ppl {short} | ppl cpu | peak GB {short} |",
                  "|---|---|---|---|---|---|---|"]
        for m, r in methods["rows"].items():
            if "error" in r:
                lines.append(f"| {m} | failed: {r['error'][:120]} | | | | | |")
                continue
            lines.append(f"| {m} | {_fmt(r.get(f'seconds_{short}'))} | {_fmt(r.get('seconds_cpu'))} | "
                         f"{_fmt(r.get('max_rel_weight_diff'))} | {_fmt(r.get(f'ppl_{short}'))} | "
                         f"{_fmt(r.get('ppl_cpu'))} | {_fmt(r.get(f'peak_gb_{short}'))} |")
    if "error" in methods:
        lines.append(f"part failed: {methods['error']}")
    lines += ["", "## layer_speed (fraction of the same run's GEMM peak)", ""]
    speed = report["parts"].get("layer_speed", {})
    for shape in speed.get("shapes", []):
        lines += [f"**{shape['shape']}** H {shape['hidden']}, I {shape['intermediate']}, {shape['experts']} experts, "
                  f"top-{shape['top_k']}, {shape['tokens']} tokens, {shape['dtype']}; GEMM peak "
                  f"{ {k: round(v) for k, v in shape['gemm_peak_gflops'].items()} } GFLOP/s", "",
                  "| stage | s | of peak | peak device GB |", "|---|---|---|---|"]
        lines += [f"| {s['stage']} | {_fmt(s['seconds'])} | {_fmt(s['peak_fraction'])} | {_fmt(s['peak_cuda_gb'])} |"
                  for s in shape["stages"]] + [""]
    if "error" in speed:
        lines.append(f"part failed: {speed['error']}")
    capped = report["parts"].get("capped", {})
    lines += ["", f"## Capped end-to-end run on the device ({capped.get('shape', '-')})", ""]
    if "rows" in capped:
        ck = capped["rows"].get("checkpoint", {})
        lines += [f"synthetic bfloat16 checkpoint: {ck.get('layers')} layers, {_fmt(ck.get('bytes', 0) / 2**30)} GiB; "
                  f"calibration {ck.get('calibration')}", "",
                  "| method | wall s | s per layer | peak device GB | peak RSS GB |", "|---|---|---|---|---|"]
        for m in CAPPED_METHODS:
            r = capped["rows"].get(m, {})
            if "error" in r or not r:
                lines.append(f"| {m} | failed: {r.get('error', 'not run')[:120]} | | | |")
                continue
            per = [s for s in r.get("layer_seconds", []) if s is not None]
            lines.append(f"| {m} | {_fmt(r['seconds'])} | {_fmt(sum(per) / len(per)) if per else '-'} | "
                         f"{_fmt(r.get('peak_device_gb'))} | {_fmt(r.get('peak_rss_gb'))} |")
    if "error" in capped:
        lines.append(f"part failed: {capped['error']}")
    ft = report["parts"].get("finetune", {})
    lines += ["", "## Compressed Experts fine-tuning on the device", ""]
    lines += [f"- {k}: {_fmt(v)}" for k, v in ft.items()] + [""]
    lines += ["## Parts", "", "| part | seconds | status |", "|---|---|---|"]
    lines += [f"| {name} | {p.get('part_seconds')} | {'failed: ' + p['error'][:100] if 'error' in p else 'ok'} |"
              for name, p in report["parts"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for report.md, report.json and each part's output")
    parser.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu")
    parser.add_argument("--quick", action="store_true", help="smoke sizes (seconds per part)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    parser.add_argument("--methods", default=None, help="methods of the `methods` part (default: all registered)")
    parser.add_argument("--capped-layers", type=int, default=3, help="decoder layers of the synthetic Qwen3-30B-A3B")
    parser.add_argument("--scratch", default=None, help="folder for the synthetic checkpoint (default: the temp dir)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=float, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.child:  # one part, in this child process
        try:
            data = PART_FUNCTIONS[args.child](args)
        except Exception as exc:
            data = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=8)}
        _write_part(args, args.child, data)
        raise SystemExit(1 if "error" in data else 0)

    print_provenance(argv)
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "versions": versions(),
              "args": vars(args), "parts": {}}
    for name in parts:
        print(f"== {name}", flush=True)
        report["parts"][name] = run_part(name, args)
        status = report["parts"][name].get("error", "ok")
        print(f"   {status} ({report['parts'][name]['part_seconds']} s)", flush=True)
        (out / "report.json").write_text(json.dumps(report, indent=1, default=str))  # partial reports survive
        (out / "report.md").write_text(markdown(report))
    print(f"report: {out / 'report.md'}")
    failed = [n for n, p in report["parts"].items() if "error" in p]
    if failed:
        print(f"failed parts: {', '.join(failed)} (see {out}/PART.log)")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
