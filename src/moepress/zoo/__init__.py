"""The reference zoo: built-in corpus, tokenizer and trained reference MoE models.

Public helpers (cheap to import; the heavy parts live in submodules):

- ``reference_model_path(name)``: the committed asset or the cached trained model;
- ``builtin_text(kind)`` / ``builtin_texts()``: the shipped calib / held-out texts (they live in
  ``moepress.resources``, which calibration and evaluation read without importing the zoo).
"""

from __future__ import annotations

from pathlib import Path

from ..resources import builtin_domains, builtin_text, builtin_text_path, builtin_texts
from .paths import ASSETS_DIR, models_dir

__all__ = ["reference_model_path", "builtin_text", "builtin_text_path", "builtin_texts", "builtin_domains",
           "REFERENCE_MODELS"]

from .recipes import RECIPES as _RECIPES  # noqa: E402  (dataclasses only: cheap)

#: Every model with a training recipe (`make zoo` builds them all).
REFERENCE_MODELS = tuple(_RECIPES)


def reference_model_path(name: str = "mixtral-ref") -> Path:
    """Directory of reference model ``name`` (loadable with ``from_pretrained``).

    The cached trained model (``$MOEPRESS_CACHE/models/NAME``) wins over the committed
    asset (``moepress/zoo/assets/NAME``); raises ``FileNotFoundError`` telling how to build it.
    """
    if name not in REFERENCE_MODELS:
        raise ValueError(f"unknown reference model {name!r}; known: {', '.join(REFERENCE_MODELS)}")
    for candidate in (models_dir() / name, ASSETS_DIR / name):
        if (candidate / "config.json").exists() and (candidate / "model.safetensors").exists():
            return candidate
    raise FileNotFoundError(
        f"reference model {name!r} is not built: run `make zoo` (or `moepress zoo train {name}`); "
        f"it will be cached under {models_dir() / name}"
    )
