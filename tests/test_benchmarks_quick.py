"""Every script under benchmarks/ runs in its quick mode and prints its provenance and its rows (issue 24).

Scripts are found by globbing `benchmarks/*.py` (helpers start with `_`), so a new script must get a
`--quick` mode and an entry in ROWS below (the lines its figures are printed on) or this test fails.
Every failure is reported at once. Scripts that need another environment are listed in ELSEWHERE
with the test that runs them there. Quick modes run tiny random models (plumbing, not quality): the
figures are checked to be printed, not to be good.

How they run: one subprocess (`sys.executable` this file, PYTHONPATH=src, offline) imports torch
and transformers once, then forks one child per script, two at a time, the longest first; each
child runs `benchmarks/NAME.py --quick [ARGS]` as `python benchmarks/NAME.py --quick` would (`sys.argv`,
`sys.path[0]` = benchmarks/, `__main__`, its own process group, stdout/stderr to files, atexit
handlers run). Why: that import is ~6 s of CPU per interpreter here, most of the test's time if
every script started a fresh one. Only third-party modules are imported before the fork, never
moepress or the benchmarks' helpers, so a missing import in a script still fails.
MOEPRESS_BENCH_FRESH=1 starts a fresh interpreter per script instead (exec, same checks).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
TIMEOUT_S = 240  # one script
PARALLEL = 2
# imported once before the scripts fork: third-party only (the ~6 s every interpreter pays)
PRELOAD = ("torch", "transformers", "transformers.modeling_utils", "transformers.activations",
           "transformers.loss.loss_utils", "transformers.integrations.finegrained_fp8")

# scripts that cannot run in this environment -> where their quick mode is tested
ELSEWHERE = {"serve_speed.py": "tests_serving/test_serve_speed_quick.py (vLLM's environment)"}
# arguments a quick run needs besides --quick ({tmp}: a scratch folder of the test)
ARGS = {"gpu_check.py": ["--device", "cpu", "--out", "{tmp}/gpu-check"]}

N = r"[+-]?[\d.,]+%?"  # one printed figure (1,234 / 0.167 / 12.5% / -0.4 / +0.1%)
F = r"(?:-?[\d.,]+|nan)"  # a figure or nan (a cell the row has no value for)


def row(label: str, *figures: str, before: str = "") -> str:
    """A table line: `before` cells (a pattern), `label` (literal), then the `figures` patterns,
    whitespace-separated."""
    return r"^\s*" + (before + r"\s+" if before else "") + re.escape(label) + "".join(r"\s+" + f for f in figures)


LAYER_SPEED_STAGES = (
    "routing + frequency", "REAP saliency", "HC-SMoE features", "M-SMoE features",
    "MergeMoE clustering + weighted average", "MergeMoE normal equations (accumulate)", "MergeMoE solve",
    "LS solve f×f", "same by eigh pseudo-inverse (old route)", "D²-MoE Grams (input + intermediate)",
    "D²-MoE whiteners (Cholesky)", "same by eigh + clamp (old route)", "D²-MoE whitened SVD (gate, up, down)",
    "same by LAPACK SVD (old route)", "D²-MoE activation error (as the method)",
    "NAEE expert outputs (all experts + full layer)", "NAEE candidate evaluation",
)
MERGEMOE_LAYER_STAGES = ("clustering (weight Gram)", "gate/up/down weighted average", "fit: P and Y_tgt over tokens",
                         "solve", "build remapped block", "calibration error (2 block forwards)")

# script -> regular expressions (re.MULTILINE) its quick output must match, one per row it reports;
# (pattern, n): at least n lines match
ROWS: dict[str, list] = {
    "baselines_quality.py": [row("original", N, N, N, before=r"0\.00")]
    + [row(m, N, N, N, N, before=r"0\.50") for m in
       ("moe_pruner", "moe_pruner:pattern=2:4", "moe_i2", "reap", "frequency", "d2moe", "hcsmoe")]
    + [r"^\s+L0:\d+e r\d+-\d+ L1:", r"^\s+L0:\[\d+(, \d+)*\] L1:\["],  # --verbose: MoE-I² ranks, HC-SMoE sizes
    "capped_run.py": [r"^checkpoint: .* GiB on disk \(2 layers, bfloat16\); cap: 4\.00 GiB",
                      r"^\$ moepress compress .* --method reap ", r"^  wall [\d.]+ s; peak RSS [\d.]+ GiB \(VmHWM\)"]
    + [rf"^    stage {s}: seconds [\d.]+, peak_rss_mb [\d.]+" for s in ("load", "calibration", "compress", "save")]
    + [r"^  output: .* parameters \d+ -> \d+", r"^  reload: finite=True "],
    "compress_time.py": [r"^model tiny random mixtral; ratio 0\.5; calibration 4 x 32 tokens",
                         r"^method\s+seconds\s+x reap\s+x d2moe\s+peak RSS GiB"]
    + [row(m, N, N, N, N) for m in ("reap", "d2moe")],
    "ce_out_of_domain.py": [r"^model .*: top-2 -> 1 main \+ 1 compressed; calibration and fine-tuning text: first half "
                            r"of linux"]
    + [row(name, *[N] * 11) for name in ("original top-2", "stock top-1", "paper vectors + finetune distill",
                                         "fitted aux 2", "fitted aux 2 + finetune distill",
                                         "fitted aux 2 + finetune vectors")],
    "compressed_experts_aux_sweep.py": [row("stock top-1", "ppl", N, "active/token", N),
                                        row("stock top-2", "ppl", N, "active/token", N),
                                        row("CE 1+1 aux width 0", "ppl", N, "active/token", N, "recovered", N),
                                        row("CE 1+1 aux width 2", "ppl", N, "active/token", N, "recovered", N)],
    "compressed_experts_quality.py": [row(name, "ppl", N, "acc", N, "active/token", N) for name in
                                      ("top-k", "top-k FT", "top-k/2", "top-k/2 FT", "CE", "CE FT", "CE+aux2",
                                       "CE+aux2 FT", "top-2", "top-2 FT")]
    + [r"^gap recovered by CE\+aux2 FT: " + N]
    + [row(name, "prefill", N, "tok/s", "decode", N, "tok/s") for name in
       ("stock top-k", "stock top-k/2", "CE", "CE+aux2", "stock top-2")],
    "compressed_experts_speed.py": [row(name, "prefill", N, "tok/s", "decode", N, "tok/s") for name in
                                    ("stock top-4", "stock top-2", "CE 2+2", "CE 2+2 aux2")]
    + [r"^CE 2\+2 vs top-4: prefill x" + N + ", decode x" + N, r"^CE 2\+2 aux2 vs top-4: prefill x"],
    "d2moe_quality.py": [row("original", N, N, N, before=r"0\.000")]
    + [row(m, N, N, N, N, before=r"0\.\d+") for m in ("d2moe", "naee", "reap", "mergemoe")]
    + [r"^\s+code=[\d.]+, foldoc=[\d.]+, french=[\d.]+, handbook=[\d.]+, linux=[\d.]+, python_docs=[\d.]+$"],
    "d2moe_speed.py": [row(name, N, N, N, N, N) for name in ("original", "d2moe 40%", "d2moe pp=0 40%")],
    "eval_speed.py": [r"^model tiny random mixtral; float32; threads \d+; seq_len 256; batch 8; 2 items per domain"]
    + [row(layout, N, N, N, N, N, before=task) for task in ("next_chunk", "domain_mc")
       for layout in ("per-request", "shared")],
    # every part ran in its child process and passed; the report was written
    "gpu_check.py": [rf"^== {part}\n(?:(?!== ).*\n)*?   ok \([\d.]+ s\)"
                     for part in ("env", "methods", "layer_speed", "capped", "finetune")]
    + [r"^report: .*gpu-check/report\.md$"],
    "layer_budget.py": [row(m, re.escape(b), r"\d+,\d+", N, N) for m in ("frequency", "reap", "mergemoe")
                        for b in ("uniform", "auto")]
    + [r"^\s+predicted Σe: uniform [\d.]+ -> auto [\d.]+", r"^\s+layer 1: 2:[\d.]+ 3:"],
    "layer_speed.py": [r"^== mixtral: H 128, I 448, 8 experts, top-2; 256 tokens; float32; cpu",
                       r"^== qwen3: H 128, I 48, 128 experts, top-8; 256 tokens; float32; cpu",
                       r"^GEMM peak \(square n=128\): .*float32 [\d.]+ GFLOP/s"]
    # every stage row, in the table of each shape
    + [(r"^\s*" + re.escape(s) + r".*\s[\d.]+\s+[\d.]+\s+[\d.]+\s+\d+[* ]\s+[\d.]+", 2) for s in LAYER_SPEED_STAGES],
    "memory_depth.py": [rf"^layers=\s*{d} model=\s*[\d.]+ MB offload={o}\s+peak_rss=\s*[\d.]+ MB time=[\d.]+ s"
                        for d in (2, 4) for o in ("True", "False")]
    + [r"^offload: 4-layer peak / 2-layer peak = [\d.]+", r"^in memory: 4-layer peak / 2-layer peak = [\d.]+"],
    "mergemoe_layer_time.py": [r"^threads \d+; GEMM 256\^3: fp32 [\d.]+ GFLOP/s, fp64 [\d.]+ GFLOP/s"]
    + [row(s, N, r"s\s+\([1-9]\d* calls\)") for s in MERGEMOE_LAYER_STAGES]
    + [row("total compress_layer", N, "s"), r"^fit stage: [\d.]+ TFLOP in [\d.]+ s = [\d.]+ GFLOP/s",
       r"^calibration relative error of the merged layer: [\d.]+"],
    "merging_diagnostics.py": [row(v, *[N] * 8) for v in
                               ("frequency", "naee", "mergemoe", "mergemoe:target=routed", "prune_refit")],
    "merging_quality.py": [row("original", N, *[N] * 8, before=r"0\.00\s+8")]
    + [row(m, N, *[N] * 8, F, N, before=r"0\.50\s+4") for m in
       ("frequency", "reap", "naee", "average", "zipit", "msmoe", "hcsmoe", "mergemoe", "mergemoe+stock")],
    "quantize_quality.py": [row(name, N, N, N, N, *[N] * 7, F) for name in
                            ("original", "int8 alone", "fp8 alone", "reap 0.5", "reap 0.5 + int8", "reap 0.5 + fp8",
                             "mergemoe 0.5", "mergemoe 0.5 + int8", "mergemoe 0.5 + fp8")],
    "stats_cache_sweep.py": [r"^d2moe \(fastest of 1; ",
                             r"^  one run, no cache, compressed propagation: calibration [\d.]+ CPU s \(fisher [\d.]+, "
                             r"forwards [\d.]+, statistics [\d.]+; ",
                             r"^  one run, no cache, original propagation: calibration [\d.]+ CPU s",
                             r"^  4-ratio sweep, fresh cache, original propagation: calibration [\d.]+ CPU s \(cache "
                             r"[\d.]+, fisher [\d.]+, forwards [\d.]+, statistics [\d.]+; .* cache hits [1-9]\d*, misses",
                             r"^  sweep calibration / one run's calibration = [\d.]+x"],
    "zoo_reference_report.py": [r"^== mixtral-ref \(MixtralConfig\)", r"^   params total [\d,]+; \d+ steps"]
    + [row(d, N, N, N, N, N) for d in ("code", "foldoc", "french", "handbook", "linux", "python_docs")]
    + [r"^   routing: mean pairwise JSD [\d.]+ bits; per layer 0:", r"^   next_chunk acc [\d.]+, domain_mc acc"],
}
# quick-mode wall seconds on an idle 2-core machine, to start the longest first (others count 10)
COST = {"gpu_check.py": 37, "memory_depth.py": 45, "compress_time.py": 30, "capped_run.py": 26,
        "stats_cache_sweep.py": 18, "quantize_quality.py": 16, "baselines_quality.py": 14, "merging_quality.py": 14,
        "layer_budget.py": 12, "d2moe_quality.py": 12}


def scripts() -> list[Path]:
    return sorted(p for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))


# ---------------------------------------------------------------- the runner (this file run as a script)
def _child(name: str, args: list[str], out: Path, fresh: bool) -> None:
    """In the forked child: `python benchmarks/NAME --quick ARGS`, output to out/NAME.{out,err}; never returns."""
    code = 1
    try:
        os.setpgid(0, 0)  # its own group: a timeout kills the script and what it started
        for fd, suffix in ((1, "out"), (2, "err")):
            os.dup2(os.open(out / f"{name}.{suffix}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        argv = [f"benchmarks/{name}", "--quick", *args]
        if fresh:
            os.execv(sys.executable, [sys.executable, *argv])  # returns only by raising
        import atexit
        import runpy
        import traceback

        sys.argv, sys.path[0] = argv, str(BENCHMARKS)
        try:
            runpy.run_path(argv[0], run_name="__main__")
            code = 0
        except SystemExit as exit_:  # as the interpreter: None -> 0, int -> itself, else printed and 1
            code = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
            if not isinstance(exit_.code, int) and exit_.code is not None:
                print(exit_.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - reported as the interpreter would
            traceback.print_exc()
        atexit._run_exitfuncs()  # e.g. the temp models of `_common.quick_model`
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_all(jobs: list[tuple[str, list[str]]], out: Path, fresh: bool) -> dict:
    """`{name: {"rc", "seconds"}}` of the `(name, arguments)` jobs, PARALLEL at a time in the given order."""
    if not fresh:
        import importlib

        for module in PRELOAD:
            importlib.import_module(module)
    pending, running, results = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < PARALLEL:
            name, args = pending.pop(0)
            pid = os.fork()
            if pid == 0:
                _child(name, args, out, fresh)
            try:
                os.setpgid(pid, pid)
            except OSError:  # the child already did (or has exec'd)
                pass
            running[pid] = (name, time.monotonic())
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            for child, (name, start) in running.items():
                if time.monotonic() - start > TIMEOUT_S:
                    try:
                        os.killpg(child, signal.SIGKILL)  # the group this runner made for it
                    except ProcessLookupError:
                        pass
            time.sleep(0.05)
            continue
        name, start = running.pop(pid)
        results[name] = {"rc": os.waitstatus_to_exitcode(status), "seconds": time.monotonic() - start}
    return results


# ---------------------------------------------------------------- the checks
def problems(name: str, result: dict, out: Path) -> list[str]:
    stdout = (out / f"{name}.out").read_text(errors="replace")
    if result["rc"] != 0:
        why = f"killed after {result['seconds']:.0f} s (timeout {TIMEOUT_S} s)" if result["rc"] == -signal.SIGKILL \
            else f"exit {result['rc']}"
        stderr = (out / f"{name}.err").read_text(errors="replace")
        return [f"{why}; stdout tail:\n{stdout[-1500:]}\nstderr tail:\n{stderr[-3000:]}"]
    found = []
    lines = stdout.splitlines()
    command = lines[0] if lines else ""
    if not (command.startswith("# command: ") and f"benchmarks/{name} --quick" in command):
        found.append(f"first line is not the command line (`_common.print_provenance()`): {command!r}")
    versions = lines[1] if len(lines) > 1 else ""
    if not re.match(r"# versions: python \d+\.\d+\.\d+, torch \S+, transformers \S+, moepress \S+.*, git ", versions):
        found.append(f"second line is not the versions (`_common.print_provenance()`): {versions!r}")
    for pattern in ROWS[name]:
        pattern, count = pattern if isinstance(pattern, tuple) else (pattern, 1)
        matches = len(re.findall(pattern, stdout, re.MULTILINE))
        if matches < count:
            found.append(f"{matches} line(s) match {pattern!r}, expected at least {count}")
    return found


def test_every_benchmark_runs_in_quick_mode(tmp_path):
    names = [p.name for p in scripts()]
    assert len(names) >= 18, names  # the glob sees the scripts
    unknown = [n for n in names if n not in ROWS and n not in ELSEWHERE]
    assert not unknown, (f"benchmark(s) {unknown} have no entry in ROWS: give each a `--quick` mode (tiny sizes, "
                         f"seconds, every row) and list the lines it prints here")
    assert not [n for n in list(ROWS) + list(ELSEWHERE) if n not in names], "ROWS/ELSEWHERE name a missing script"
    todo = sorted((n for n in names if n not in ELSEWHERE), key=lambda n: -COST.get(n, 10))
    out, scratch = tmp_path / "out", tmp_path / "tmp"
    out.mkdir()
    scratch.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TMPDIR": str(scratch),
           # two scripts share two cores: one intra-op thread each (no OpenMP spinning against the other)
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    jobs = [(name, [a.replace("{tmp}", str(scratch)) for a in ARGS.get(name, [])]) for name in todo]
    runner = subprocess.run([sys.executable, __file__, str(out), json.dumps(jobs)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=TIMEOUT_S * len(todo))
    assert runner.returncode == 0, runner.stderr[-3000:]
    results = json.loads(runner.stdout.splitlines()[-1])
    assert sorted(results) == sorted(todo), results
    failed = {name: found for name in todo if (found := problems(name, results[name], out))}
    seconds = ", ".join(f"{name} {results[name]['seconds']:.0f}s" for name in todo)
    assert not failed, "\n\n".join(f"{name} --quick:\n  " + "\n  ".join(found) for name, found in failed.items()) \
        + f"\n\n(seconds: {seconds})"


if __name__ == "__main__":  # the runner: python tests/test_benchmarks_quick.py OUT_DIR '[["NAME.py", [ARG, ...]], ...]'
    print(json.dumps(run_all(json.loads(sys.argv[2]), Path(sys.argv[1]), os.environ.get("MOEPRESS_BENCH_FRESH") == "1")))
