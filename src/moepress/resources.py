"""Files moepress reads and keeps: the shipped texts and the user cache.

The shipped texts (the multi-domain calibration text and one held-out text per domain) are
written into the zoo's assets by `moepress zoo corpus --export-texts`; calibration, evaluation
and the zoo all read them through here. This module imports nothing from moepress, so `calib`
and `eval` use the texts without depending on `zoo` (which itself uses `eval` to measure its
reference models).
"""

from __future__ import annotations

import os
from pathlib import Path

TEXTS_DIR = Path(__file__).resolve().parent / "zoo" / "assets" / "texts"


def cache_dir() -> Path:
    """The moepress cache: ``$MOEPRESS_CACHE`` if set, else ``~/.cache/moepress`` (created)."""
    root = os.environ.get("MOEPRESS_CACHE")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "moepress"
    path.mkdir(parents=True, exist_ok=True)
    return path


def builtin_domains() -> list[str]:
    """Domains with a shipped held-out text (e.g. linux, python_docs, foldoc, code, french, handbook)."""
    return sorted(p.stem for p in (TEXTS_DIR / "heldout").glob("*.txt"))


def builtin_text_path(kind: str = "calib") -> Path:
    """The file of ``"calib"``, ``"heldout:<domain>"`` or ``"<domain>"`` (held-out)."""
    if kind == "calib":
        path = TEXTS_DIR / "calib.txt"
    else:
        domain = kind.split(":", 1)[1] if kind.startswith("heldout:") else kind
        path = TEXTS_DIR / "heldout" / f"{domain}.txt"
    if not path.exists():
        raise ValueError(f"no built-in text {kind!r}; available: calib, "
                         + ", ".join(f"heldout:{d}" for d in builtin_domains()))
    return path


def builtin_text(kind: str = "calib") -> str:
    """A shipped text itself (see `builtin_text_path` for the names)."""
    return builtin_text_path(kind).read_text()


def builtin_texts(split: str = "heldout") -> dict[str, str]:
    """All shipped held-out texts, ``{domain: text}``."""
    if split != "heldout":
        raise ValueError("only the held-out texts are shipped per domain; use builtin_text('calib')")
    return {d: builtin_text(f"heldout:{d}") for d in builtin_domains()}
