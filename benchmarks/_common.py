"""Helpers shared by the benchmark scripts (not a benchmark itself: names starting with `_` are helpers).

`python benchmarks/NAME.py` puts `benchmarks/` first on `sys.path`, so a script imports this module
as `import _common` / `from _common import ...`, with no path manipulation.

- `print_provenance()`: the command line and versions a figure was produced with, printed first;
- `quick(parser, args, **values)`: the `--quick` convention (tiny sizes, seconds; an option given on the
  command line is kept, so `--quick --tokens 2048` keeps 2048);
- the held-out evaluation of the quality tables (`heldout_files`, `evaluate`, `domain_calibration`);
- the Compressed Experts helpers (`load_reference`, `windows`, `heldout_quality`, `stock_top`,
  `with_compressed_experts`, `with_fitted_auxiliary`, `speed`, `builtin_streams`);
- `CallTimer`: seconds spent inside given library functions, observed without patching them.
"""

from __future__ import annotations

import argparse
import copy
import math
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- provenance and --quick
def _git_commit() -> str:
    """`abc1234` (+ ` (uncommitted changes)`) of the repository the script lives in, or `-` outside git."""
    def git(*cmd):  # --no-optional-locks: never take the index lock (someone may be committing)
        return subprocess.run(["git", "--no-optional-locks", "-C", str(REPO), *cmd], capture_output=True,
                              text=True, timeout=10)

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return "-"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "-"
    return head.stdout.strip() + (" (uncommitted changes)" if dirty else "")


def versions(extra: tuple[str, ...] = ()) -> str:
    """`python X, torch Y, transformers Z, moepress W[, extra...], git C`."""
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"python {sys.version.split()[0]}"]
    for name in ("torch", "transformers", "moepress", *extra):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} -")
    return ", ".join(parts) + f", git {_git_commit()}"


def print_provenance(argv: list[str] | None = None, extra: tuple[str, ...] = ()) -> None:
    """Print `# <command line>` and `# <versions>`: the first lines of every benchmark's output."""
    import shlex

    args = sys.argv[1:] if argv is None else list(argv)
    print(f"# command: {shlex.join([sys.executable, sys.argv[0], *args])}")
    print(f"# versions: {versions(extra)}", flush=True)


def quick(parser, args, argv=None, **values) -> None:
    """With `args.quick`, set each option of `values` (argparse destinations: `seq_len` for `--seq-len`)
    that the command line does not give; one it gives is kept (`--quick --tokens 2048` keeps 2048)."""
    if not getattr(args, "quick", False):
        return
    unset = object()
    probe = parser.parse_args(argv, namespace=argparse.Namespace(**{name: unset for name in values}))
    for name, value in values.items():  # argparse leaves a namespace attribute alone unless the option is given
        if getattr(probe, name) is unset:
            setattr(args, name, value)


def quick_model(family: str = "mixtral", layers: int = 2, **overrides) -> Path:
    """A tiny random `family` model (moepress.testing.tiny_model) with mixtral-ref's tokenizer, saved in a
    temp dir removed at exit: the `--quick` stand-in for a reference model (plumbing, not quality)."""
    import atexit
    import shutil
    import tempfile

    import transformers

    from moepress.testing import tiny_model
    from moepress.zoo import reference_model_path

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(reference_model_path("mixtral-ref")))
    ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    model = tiny_model(family, num_layers=layers, vocab_size=len(tokenizer), **{k: v for k, v in ids.items() if v is not None},
                       **overrides)
    path = Path(tempfile.mkdtemp(prefix=f"moepress-quick-{family}-"))
    atexit.register(shutil.rmtree, path, True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------- devices and the GEMM peak
def sync(device) -> None:
    """Wait for queued CUDA work (a no-op on the CPU), so a clock reading sees finished work."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def gemm_gflops(size: int, dtype=None, device="cpu", repeats: int = 5) -> float:
    """Best-of-`repeats` GFLOP/s of a square `[size, size] @ [size, size]` matmul on `device` (after
    a warm-up): the peak a stage's FLOP rate is compared with."""
    import torch

    dtype = dtype or torch.float32
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b
    best = math.inf
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


# ---------------------------------------------------------------- held-out evaluation (quality tables)
def heldout_files(chars: int) -> list[str]:
    """The zoo's held-out texts, each cut to its first `chars` characters (0 = whole), as temp files
    (removed at exit)."""
    import atexit
    import shutil
    import tempfile

    from moepress.zoo import builtin_domains, builtin_text

    folder = Path(tempfile.mkdtemp(prefix="moepress-heldout-"))
    atexit.register(shutil.rmtree, folder, True)
    paths = []
    for domain in builtin_domains():
        text = builtin_text(f"heldout:{domain}")
        path = folder / f"{domain}.txt"
        path.write_text(text[:chars] if chars else text)
        paths.append(str(path))
    return paths


def domain_calibration(domain: str | None) -> str | None:
    """The calibration split of one corpus domain (jsonl), or None for the built-in multi-domain text."""
    if domain is None:
        return None
    from moepress.zoo.paths import corpus_dir

    path = corpus_dir() / domain / "calib.jsonl"
    if not path.exists() or path.stat().st_size == 0:
        raise SystemExit(f"no calibration split for domain {domain!r} at {path}: run `moepress zoo corpus` first "
                         f"(domains with a calibration split: code, foldoc, french, linux, python_docs)")
    return str(path)


def evaluate(model, tokenizer, args) -> dict:
    """Held-out perplexity of `args.heldout` files (geometric mean and per domain), next-chunk accuracy,
    routed-expert parameters (the evaluation of merging_quality, baselines_quality, layer_budget, ...)."""
    import moepress
    from moepress.arch import parameter_counts

    report = moepress.evaluate(model, tokenizer=tokenizer, ppl=args.heldout,
                               tasks=["next_chunk"], seq_len=args.eval_seq_len, mc_per_domain=args.mc_per_domain)
    ppl = {Path(k.split("/", 1)[1]).stem: v for k, v in report.metrics.items() if k.startswith("ppl/")}
    return {"ppl": math.exp(sum(math.log(v) for v in ppl.values()) / len(ppl)), "per_domain": ppl,
            "acc": report.metrics["next_chunk/acc"], "routed": parameter_counts(model)["routed_experts"]}


# ---------------------------------------------------------------- Compressed Experts (quality, sweep, speed)
def load_reference(name_or_path: str):
    """`(model float32 eval, tokenizer, path)` of a zoo name or a model directory."""
    import torch
    import transformers

    from moepress import zoo

    path = Path(name_or_path) if Path(name_or_path).exists() else zoo.reference_model_path(name_or_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(str(path)), path


def builtin_streams(tokenizer, split: str):
    """`{domain: token ids}` of the shipped texts (`split` "heldout": one per domain; else the calibration
    text): the `--quick` stand-in for `moepress.zoo.train.token_streams`, which needs the built corpus."""
    import numpy as np

    from moepress.zoo import builtin_domains, builtin_text

    kinds = {d: f"heldout:{d}" for d in builtin_domains()} if split == "heldout" else {"calib": "calib"}
    return {name: np.asarray(tokenizer(builtin_text(kind), add_special_tokens=False)["input_ids"], dtype=np.int64)
            for name, kind in kinds.items()}


def windows(streams: dict, seq_len: int, per_domain: int, seed: int):
    """`[n, seq_len]` int64 windows, `per_domain` random ones from each stream long enough."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    rows = []
    for name in sorted(streams):
        s = streams[name]
        if len(s) <= seq_len + 1:
            continue
        for start in rng.integers(0, len(s) - seq_len, per_domain):
            rows.append(s[start: start + seq_len].astype(np.int64))
    return torch.from_numpy(np.stack(rows))


def heldout_quality(model, ids, batch: int = 8) -> tuple[float, float]:
    """(perplexity, next-token accuracy) of `model` on the windows `ids`."""
    import numpy as np
    import torch

    nll = correct = count = 0.0
    with torch.no_grad():
        for i in range(0, ids.shape[0], batch):
            x = ids[i: i + batch]
            logits = model(input_ids=x).logits[:, :-1].float()
            target = x[:, 1:]
            nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").item()
            correct += (logits.argmax(-1) == target).sum().item()
            count += target.numel()
    return float(np.exp(nll / count)), correct / count


def with_compressed_experts(model, k_main: int, aux_width: int | None = None):
    """CE blocks with vectors at one (and zero mini-experts of width `aux_width`: timing only)."""
    from moepress.arch import moe_layer_views, set_moe_block
    from moepress.modeling.moepress_compressed import CompressedExpertsBlock

    model = copy.deepcopy(model)
    for view in moe_layer_views(model):
        block = CompressedExpertsBlock(view.block, model.config, k_main=k_main, aux_width=aux_width)
        set_moe_block(model, view.layer_index, block)
    return model


def with_fitted_auxiliary(path, k_main: int, width: int, samples: int, seq_len: int):
    """CE with width-`width` auxiliary mini-experts fitted by `moepress.compress` (built-in calibration text)."""
    import moepress

    result = moepress.compress(str(path), "compressed_experts", k_main=k_main, aux_width=width, samples=samples,
                               seq_len=seq_len, seed=0, offload=False, stats_cache=False, dtype="float32")
    return result.model.float().eval()


def stock_top(model, k: int):
    """The stock model routing each token to its top-`k` experts (the paper's Top-k/2 baseline)."""
    from moepress.arch import moe_layer_views

    model = copy.deepcopy(model)
    model.config.num_experts_per_tok = k
    for view in moe_layer_views(model):
        view.router.top_k = k
    return model


def speed(models: dict, vocab: int, reps: int, prefill=(4, 256), decode=(8, 32)) -> dict[str, tuple[float, float]]:
    """{name: (prefill tok/s at `prefill` = (batch, length), decode tok/s at `decode` = (batch, new tokens))},
    best of `reps`, the models interleaved within each repetition so machine load hits them alike."""
    import torch

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(2, vocab, prefill, generator=g)
    short = torch.randint(2, vocab, decode, generator=g)
    new = decode[1]
    best = {name: [float("inf"), float("inf")] for name in models}
    with torch.no_grad():
        for _ in range(reps):
            for name, model in models.items():
                t = time.perf_counter()
                model(input_ids=prompt, use_cache=False)
                best[name][0] = min(best[name][0], time.perf_counter() - t)
                t = time.perf_counter()
                model.generate(short, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
                best[name][1] = min(best[name][1], time.perf_counter() - t)
    return {name: (prompt.numel() / p, short.shape[0] * new / d) for name, (p, d) in best.items()}


# ---------------------------------------------------------------- timing library functions from outside
class CallTimer:
    """Seconds spent inside given functions while the `with` block runs, by label.

    Observed with `sys.setprofile` on the functions' code objects, so the library runs exactly as
    shipped (nothing is replaced; a call through any imported name is seen). A labelled call inside
    another labelled call counts for the outer one only, unless its label is in `carve_out` (and
    differs from the outer's): then its time counts for its own label and is taken out of the
    outer's. `clock`: `time.perf_counter` (wall) or `time.process_time` (CPU); `wall` sums the wall
    seconds of the outermost calls. `sync` (e.g. `torch.cuda.synchronize`) runs before each reading
    of the clock. Not for generator functions (each `yield` is a return to the profiler). The hook
    sees every call of the thread, which costs ~1 µs per Python call made inside the block:
    negligible at real layer sizes.

        with CallTimer({"fit": mergemoe.down_projection_equations}) as timer:
            method.merge(ctx, m)
        timer.seconds["fit"]
    """

    def __init__(self, functions: dict, clock=time.perf_counter, sync=None, carve_out=()):
        import inspect

        self.labels = {}
        for label, fns in functions.items():
            for fn in fns if isinstance(fns, (list, tuple)) else (fns,):
                self.labels[inspect.unwrap(fn).__code__] = label
        self.clock, self.sync, self.carve_out = clock, sync, frozenset(carve_out)
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.wall = 0.0
        self._open = []  # [frame, label, clock start, wall start, clock seconds carved out] of open calls

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def _read(self) -> tuple[float, float]:
        if self.sync:
            self.sync()
        return self.clock(), time.perf_counter()

    def _profile(self, frame, event, arg):
        if event == "call":
            label = self.labels.get(frame.f_code)
            if label is None:
                return
            if not self._open or (label in self.carve_out and label != self._open[-1][1]):
                self._open.append([frame, label, *self._read(), 0.0])
        elif event == "return" and self._open and frame is self._open[-1][0]:
            _, label, start, wall, carved = self._open.pop()
            now, now_wall = self._read()
            self.seconds[label] += now - start - carved
            self.calls[label] += 1
            if self._open:
                self._open[-1][4] += now - start
            else:
                self.wall += now_wall - wall

    def __enter__(self):
        self._previous = sys.getprofile()
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc):
        sys.setprofile(self._previous)
        return False
