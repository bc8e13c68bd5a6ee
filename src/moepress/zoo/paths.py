"""Where the zoo keeps things: the user cache (never the repository) and the shipped assets."""

from __future__ import annotations

from pathlib import Path

from ..resources import cache_dir  # noqa: F401  (the one cache location; zoo modules import it from here)

ASSETS_DIR = Path(__file__).resolve().parent / "assets"

#: Bumped whenever the corpus cleaning or split rule changes, so stale caches are not reused.
CORPUS_VERSION = "v1"


def corpus_dir() -> Path:
    return cache_dir() / "corpus" / CORPUS_VERSION


def tokenizer_dir() -> Path:
    return cache_dir() / "tokenizer" / CORPUS_VERSION


def models_dir() -> Path:
    return cache_dir() / "models"
