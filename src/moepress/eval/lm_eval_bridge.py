"""Running lm-evaluation-harness tasks offline through its Python API.

Two built-in lm-eval tasks are generated from the shipped held-out texts (YAML + local jsonl
under the cache, read with lm-eval's ``json`` dataset builder):

- ``moepress_next_chunk``: multiple choice, the same items as the local ``next_chunk`` task;
- ``moepress_heldout_ppl``: ``loglikelihood_rolling`` over held-out paragraphs
  (word/byte perplexity, bits per byte).

Any other name is handed to lm-eval as is (its own tasks need their datasets in the local HF
cache: the machine is offline).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

BUILTIN_LM_EVAL_TASKS = ("moepress_next_chunk", "moepress_heldout_ppl")

_MC_YAML = """task: moepress_next_chunk
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_PPL_YAML = """task: moepress_heldout_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
should_decontaminate: false
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
"""


def _offline_env() -> None:
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")


def write_builtin_tasks(folder: Path | None = None, per_domain: int = 16, seed: int = 0) -> Path:
    """Write the built-in lm-eval task YAMLs and their jsonl data; returns the include path."""
    from ..resources import builtin_texts, cache_dir
    from .local_tasks import build_items

    texts = builtin_texts()
    items = build_items("next_chunk", texts, per_domain=per_domain, seed=seed)
    paragraphs = [{"domain": d, "text": p} for d, t in sorted(texts.items())
                  for p in t.split("\n\n")[:per_domain] if p.strip()]
    key = hashlib.sha1(json.dumps([items, paragraphs]).encode()).hexdigest()[:12]
    folder = Path(folder) if folder else cache_dir() / "lm_eval_tasks" / key
    if (folder / "moepress_heldout_ppl.yaml").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("next_chunk.jsonl", items), ("heldout_ppl.jsonl", paragraphs)):
        with open(folder / name, "w") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    (folder / "moepress_next_chunk.yaml").write_text(_MC_YAML.format(data=json.dumps(str(folder / "next_chunk.jsonl"))))
    (folder / "moepress_heldout_ppl.yaml").write_text(_PPL_YAML.format(data=json.dumps(str(folder / "heldout_ppl.jsonl"))))
    return folder


def run_lm_eval(model, tokenizer, tasks: list[str], batch_size: int = 8, limit: int | float | None = None,
                include_path: Path | None = None) -> dict[str, dict[str, float]]:
    """Evaluate an in-memory model on lm-eval ``tasks``; returns ``{task: {metric: value}}``."""
    _offline_env()
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError("lm-eval tasks need the eval extra: pip install 'moepress[eval]'") from err

    include = str(include_path or write_builtin_tasks())
    # Indexing lm-eval's own ~10k task configs takes seconds; skip it when only ours are asked for.
    only_builtin = all(t in BUILTIN_LM_EVAL_TASKS for t in tasks)
    manager = TaskManager(include_path=include, include_defaults=not only_builtin)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        raise ValueError(f"unknown lm-eval task(s) {', '.join(missing)}; built-in: {', '.join(BUILTIN_LM_EVAL_TASKS)}, "
                         "local (no lm-eval): next_chunk, domain_mc")
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                      log_samples=False, bootstrap_iters=0)
    except Exception as err:  # typically a dataset that is not in the offline cache
        raise RuntimeError(f"lm-eval could not run {tasks}: {err}. This machine is offline: lm-eval's own "
                           "tasks need their datasets already in the local HF datasets cache.") from err
    results = {}
    for task, metrics in out["results"].items():
        results[task] = {k.split(",")[0]: float(v) for k, v in metrics.items()
                         if isinstance(v, (int, float)) and not k.startswith(("alias", "sample_len")) and "_stderr" not in k}
    return results
