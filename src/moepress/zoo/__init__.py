"""The reference zoo: built-in corpus, tokenizer and trained reference MoE models.

Public helpers (cheap to import; the heavy parts live in submodules):

- ``reference_model_path(name)``: the committed asset or the cached trained model;
- ``builtin_text(kind)`` / ``builtin_texts()``: the shipped calib / held-out texts.
"""

from __future__ import annotations

from pathlib import Path

from .paths import ASSETS_DIR, models_dir

__all__ = ["reference_model_path", "builtin_text", "builtin_texts", "builtin_domains", "REFERENCE_MODELS"]

REFERENCE_MODELS = ("mixtral-ref", "deepseek-ref", "olmoe-ref")
_TEXTS = ASSETS_DIR / "texts"


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


def builtin_domains() -> list[str]:
    """Domains with a shipped held-out text (e.g. linux, python_docs, foldoc, code, french, handbook)."""
    return sorted(p.stem for p in (_TEXTS / "heldout").glob("*.txt"))


def builtin_text(kind: str = "calib") -> str:
    """A shipped text: ``"calib"``, ``"heldout:<domain>"`` or just ``"<domain>"`` (held-out).

    Returns the text itself; ``builtin_text_path`` gives the file.
    """
    return builtin_text_path(kind).read_text()


def builtin_text_path(kind: str = "calib") -> Path:
    if kind == "calib":
        path = _TEXTS / "calib.txt"
    else:
        domain = kind.split(":", 1)[1] if kind.startswith("heldout:") else kind
        path = _TEXTS / "heldout" / f"{domain}.txt"
    if not path.exists():
        raise ValueError(f"no built-in text {kind!r}; available: calib, "
                         + ", ".join(f"heldout:{d}" for d in builtin_domains()))
    return path


def builtin_texts(split: str = "heldout") -> dict[str, str]:
    """All shipped held-out texts, ``{domain: text}``."""
    if split != "heldout":
        raise ValueError("only the held-out texts are shipped per domain; use builtin_text('calib')")
    return {d: builtin_text(f"heldout:{d}") for d in builtin_domains()}
