"""Greedy generation with vLLM for checkpoints given on the command line (run in vLLM's environment).

    python -m moepress.serving.vllm_generate --prompts prompts.json --max-tokens 8 OUT1 OUT2 ...

`prompts.json` is a list of token-id lists. Prints one JSON line per checkpoint:
`{"model": DIR, "tokens": [[...] per prompt], "logprobs": [[...] per prompt], "seconds": s}`
with the log-probability vLLM gives each chosen token (with `--describe` also `"layers"`: how each
decoder layer's MoE module is served, `vllm_models.served_layer_paths`, for moepress
architectures), or `{"model": DIR, "error": ...}` for a
checkpoint vLLM could not serve (the others still run; the exit status is then 1). Used by the serving parity tests and
`benchmarks/serve_speed.py`; the models are served one after another in this one process.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time


def engine(model: str, dtype: str = "float32", max_model_len: int = 256, eager: bool = True, **extra):
    """A vLLM `LLM` for `model` with this machine's defaults (CPU: KV cache space from
    `VLLM_CPU_KVCACHE_SPACE`, 1 GiB unless set; a small share of memory reserved)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    return LLM(model=model, dtype=dtype, max_model_len=max_model_len, enforce_eager=eager,
               skip_tokenizer_init=True, gpu_memory_utilization=extra.pop("gpu_memory_utilization", 0.3), **extra)


def greedy(llm, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy continuations of `prompts` in one batch, and the log-probability of each chosen token."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0, max_tokens=max_tokens, detokenize=False, logprobs=1, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    tokens, logprobs = [], []
    for out in outputs:
        seq = out.outputs[0]
        tokens.append(list(seq.token_ids))
        logprobs.append([float(step[tok].logprob) for tok, step in zip(seq.token_ids, seq.logprobs)])
    return tokens, logprobs


def describe(llm) -> dict[str, str] | None:
    """`vllm_models.served_layer_paths` of the engine's model (the first worker's), or None for an
    architecture the plugin does not provide."""
    from . import vllm_models

    def paths(model):
        return vllm_models.served_layer_paths(model) if hasattr(model, "_moepress_config") else None

    return llm.apply_model(paths)[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--prompts", required=True, help="JSON file: a list of token-id lists")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--one-by-one", action="store_true",
                        help="also generate every prompt alone (its output must not depend on the batch)")
    parser.add_argument("--describe", action="store_true",
                        help="also record how each layer's MoE module is served (fused / opaque / stock)")
    args = parser.parse_args(argv)
    if args.describe:  # apply_model's function reaches an in-process engine without pickling
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    prompts = json.loads(open(args.prompts).read())
    failed = 0
    for model in args.models:
        started = time.perf_counter()
        llm = None
        try:
            llm = engine(model, dtype=args.dtype)
            tokens, logprobs = greedy(llm, prompts, args.max_tokens)
            record = {"model": model, "tokens": tokens, "logprobs": logprobs}
            if args.describe:
                record["layers"] = describe(llm)
            if args.one_by_one:
                alone = [greedy(llm, [p], args.max_tokens) for p in prompts]
                record["alone_tokens"] = [t[0] for t, _ in alone]
                record["alone_logprobs"] = [lp[0] for _, lp in alone]
        except Exception as error:  # noqa: BLE001 - reported per checkpoint; the next one still runs
            record, failed = {"model": model, "error": f"{type(error).__name__}: {error}"}, failed + 1
        record["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps(record), flush=True)
        del llm
        gc.collect()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
