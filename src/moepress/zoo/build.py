"""Building the zoo end to end: corpus -> tokenizer -> reference models (-> shipped assets).

``python -m moepress.zoo.build NAME ...`` trains the named models in order (what
``moepress zoo build-all`` does), skipping those already in the cache.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from .paths import ASSETS_DIR, models_dir
from .recipes import RECIPES, get_recipe


def cached_model_path(name: str) -> Path:
    return models_dir() / name


def train_reference(name: str, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Train reference model ``name`` into the cache (skipped when it is already there)."""
    import shutil

    from transformers import AutoTokenizer

    from .corpus import build_corpus
    from .tokenizer import build_tokenizer
    from .train import token_streams, train_model

    recipe = get_recipe(name)
    out = cached_model_path(name)
    if (out / "train_log.json").exists() and not force:
        log(f"{name}: cached at {out}")
        return out
    if force and out.exists():
        shutil.rmtree(out)
    build_corpus(log=log)
    tokenizer = AutoTokenizer.from_pretrained(build_tokenizer())
    train = token_streams("train", tokenizer)
    heldout = token_streams("heldout", tokenizer)
    log(f"{name}: training {recipe.steps} steps -> {out}")
    train_model(recipe, out, train, heldout, tokenizer=tokenizer, log=log)
    try:
        finalize_reference(name, log=log)
    except Exception:  # the model is trained and saved; the report can be redone with `zoo report`
        log(f"{name}: final report failed:\n{traceback.format_exc()}")
    return out


def finalize_reference(name: str, log: Callable[[str], None] = print) -> dict:
    """Measure the trained model (held-out ppl vs unigram, routing specialisation), record it in
    ``train_log.json`` and, for committed recipes, export the fp16 asset."""
    from .report import reference_report

    path = cached_model_path(name)
    report = reference_report(path)
    log_path = path / "train_log.json"
    train_log = json.loads(log_path.read_text())
    train_log["evaluation"] = report
    log_path.write_text(json.dumps(train_log, indent=2))
    log(f"{name}: " + json.dumps(report["summary"]))
    if get_recipe(name).commit:
        from .assets import export_asset

        export_asset(path, ASSETS_DIR / name)
        log(f"{name}: exported to {ASSETS_DIR / name}")
    return report


def build_all(force: bool = False, log: Callable[[str], None] = print) -> list[Path]:
    return [train_reference(name, force=force, log=log) for name in RECIPES]


if __name__ == "__main__":
    for model_name in sys.argv[1:] or list(RECIPES):
        train_reference(model_name, log=lambda s: print(s, flush=True))
