"""vLLM serves every moepress output as transformers runs it (`make test-serving`; CI runs it).

Needs vLLM's CPU build in its own venv with moepress installed into it (`make vllm-venv`), named by
`MOEPRESS_VLLM_PYTHON`. Every registered method (and `--quantize int8`, `--budget auto`, D²-MoE's
paper per-batch form is left out: it is batch-dependent by design) compresses two sources:
`mixtral-ref` (the trained reference) and a random Qwen3-MoE with head_dim 32 (vLLM's CPU attention
refuses 16) whose head is scaled so greedy choices are decisive; random Qwen2-MoE and OLMoE models
get one variant of each block kind. All outputs are served one after
another in one vLLM process, each prompt batched with the others and alone; transformers
(`moepress.load`, this venv's transformers) computes the same greedy continuations with and without
its KV cache.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import transformers

import moepress
from moepress.methods import available_methods
from moepress.zoo import reference_model_path

VLLM_PYTHON = os.environ.get("MOEPRESS_VLLM_PYTHON", ".venv-vllm/bin/python")
PROMPTS = [[1, 5, 9, 100, 200, 300], [7, 8, 9, 10], [400, 12, 77, 3000, 15, 16, 17, 18, 19, 20, 21], [42]]
MAX_TOKENS = 8
# log-probabilities of the chosen tokens, vLLM vs transformers, float32 on both sides: only kernel
# order separates them
LOGPROB_ATOL = 2e-3
CALIBRATION = {"samples": 16, "seq_len": 64}
OPTIONS = {"mergemoe": {"tokens": "all"}}
VARIANTS = {
    **{name: (name, {}) for name in available_methods()},
    "reap+int8": ("reap", {"quantize": "int8"}),
    "reap+budget-auto": ("reap", {"budget": "auto"}),
    "mergemoe+layers": ("mergemoe", {"layers": "1", "tokens": "all"}),
    "compressed_experts+aux": ("compressed_experts", {"aux_width": 16}),
    "compressed_experts+paper": ("compressed_experts", {"aux_width": None}),  # the paper's block (vectors only)
}


# random sources: hidden 128 with 4 heads of 32 (vLLM's CPU attention refuses head_dim 16), 8 experts, top-2
RANDOM_SOURCES = {
    "qwen3": ("Qwen3MoeConfig", dict(moe_intermediate_size=96, num_experts=8, norm_topk_prob=True, head_dim=32)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(moe_intermediate_size=96, shared_expert_intermediate_size=128,
                                         num_experts=8, norm_topk_prob=False)),
    "olmoe": ("OlmoeConfig", dict(num_experts=8)),
}
# every registered method on the first two sources; the block kinds on the other families
KIND_VARIANTS = ("mergemoe", "d2moe", "compressed_experts+aux", "moe_i2", "reap+int8")
KEYS = ([(s, v) for s in ("mixtral-ref", "qwen3") for v in ("original", *VARIANTS)]
        + [(s, v) for s in ("qwen2_moe", "olmoe") for v in ("original", *KIND_VARIANTS)])


def _random_source(name: str, directory: Path) -> Path:
    """A random model of `name`'s family with mixtral-ref's tokenizer; router and head scaled so
    routing and greedy choices are decisive (no near-ties for kernel rounding to flip)."""
    class_name, extra = RANDOM_SOURCES[name]
    config = getattr(transformers, class_name)(
        vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=512, tie_word_embeddings=False,
        **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(8.0)
        model.lm_head.weight.mul_(30.0)
    model.save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(reference_model_path("mixtral-ref")).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """`{(source, variant): (checkpoint dir, vLLM record)}` for every source and variant."""
    # MOEPRESS_SERVING_WORK: keep the checkpoints there and reuse them (developing the plugin)
    keep = os.environ.get("MOEPRESS_SERVING_WORK")
    root = Path(keep) if keep else tmp_path_factory.mktemp("serving")
    root.mkdir(parents=True, exist_ok=True)
    # MOEPRESS_SERVING_SOURCES: a comma list of the sources to serve (select their tests with -k)
    only = set(filter(None, os.environ.get("MOEPRESS_SERVING_SOURCES", "").split(",")))
    sources = {"mixtral-ref": reference_model_path("mixtral-ref")}
    for name in RANDOM_SOURCES:
        src = root / f"{name}-src"
        sources[name] = src if (src / "config.json").exists() else _random_source(name, src)
    outputs = {}
    for source_name, source in sources.items():
        if only and source_name not in only:
            continue
        outputs[(source_name, "original")] = Path(source)
        for variant, (method, options) in VARIANTS.items():
            if (source_name, variant) not in KEYS:
                continue
            out = root / f"{source_name}-{variant}"
            if not (out / "moepress.json").exists():
                options = {**OPTIONS.get(method, {}), **options}
                result = moepress.compress(str(source), method, ratio=0.5, **CALIBRATION, **options)
                result.save(out)
            outputs[(source_name, variant)] = out
    records = serve(list(outputs.values()), root, "--one-by-one")
    return {key: (path, records[str(path)]) for key, path in outputs.items()}


def serve(paths: list[Path], root: Path, *flags: str, need_tokens: bool = False) -> dict[str, dict]:
    """`{checkpoint: vllm_generate's record}` for `paths`, all served one after another in one vLLM
    process on PROMPTS (written to `root`); a checkpoint with no record (or, with `need_tokens`, an
    error record) fails with vLLM's output."""
    prompts = root / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    proc = subprocess.run([VLLM_PYTHON, "-m", "moepress.serving.vllm_generate", "--prompts", str(prompts),
                           "--max-tokens", str(MAX_TOKENS), *flags, *map(str, paths)],
                          capture_output=True, text=True, env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
    records = {}
    for line in proc.stdout.splitlines():
        if line.startswith('{"model"'):
            record = json.loads(line)
            records[record["model"]] = record
    missing = [f"{p}: {records.get(str(p), {}).get('error', 'no record')}" for p in paths
               if str(p) not in records or (need_tokens and "tokens" not in records[str(p)])]
    assert not missing, f"vLLM served no result for {missing}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return records


def _transformers_greedy(model, prompt: list[int], use_cache: bool) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, use_cache=use_cache,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def _logprobs(model, prompt: list[int], continuation: list[int]) -> list[float]:
    """Log-probability of each continuation token given what precedes it (one forward, no cache)."""
    ids = torch.tensor([prompt + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    return [float(logp[len(prompt) - 1 + i, tok]) for i, tok in enumerate(continuation)]




@pytest.mark.parametrize("source,variant", KEYS, ids=[f"{s}-{v}" for s, v in KEYS])
def test_vllm_greedy_equals_transformers(served, source, variant):
    path, record = served[(source, variant)]
    model = moepress.load(path)
    for i, prompt in enumerate(PROMPTS):
        cached = _transformers_greedy(model, prompt, use_cache=True)
        uncached = _transformers_greedy(model, prompt, use_cache=False)
        assert cached == uncached, f"prompt {i}: transformers with and without KV cache differ"
        assert record["tokens"][i] == cached, f"prompt {i}: vLLM {record['tokens'][i]} vs transformers {cached}"
        reference = _logprobs(model, prompt, cached)
        assert max(abs(a - b) for a, b in zip(record["logprobs"][i], reference)) < LOGPROB_ATOL
        # a prompt's output in vLLM does not depend on the prompts batched with it
        assert record["alone_tokens"][i] == record["tokens"][i]
        assert max(abs(a - b) for a, b in zip(record["alone_logprobs"][i], record["logprobs"][i])) < LOGPROB_ATOL


def test_every_variant_is_served_through_the_expected_model_class(served):
    """Stock outputs keep the family's class; custom ones name a moepress class the plugin provides."""
    from moepress.serving.vllm_plugin import architectures

    for (source, variant), (path, _) in served.items():
        arch = json.loads((Path(path) / "config.json").read_text())["architectures"][0]
        custom = (Path(path) / "modeling_moepress.py").exists()
        assert (arch in architectures()) == custom, (source, variant, arch)
