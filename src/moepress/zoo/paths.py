"""Where the zoo keeps things: the user cache (never the repository) and the shipped assets."""

from __future__ import annotations

import os
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"

#: Bumped whenever the corpus cleaning or split rule changes, so stale caches are not reused.
CORPUS_VERSION = "v1"


def cache_dir() -> Path:
    """The moepress cache: ``$MOEPRESS_CACHE`` if set, else ``~/.cache/moepress``."""
    root = os.environ.get("MOEPRESS_CACHE")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "moepress"
    path.mkdir(parents=True, exist_ok=True)
    return path


def corpus_dir() -> Path:
    return cache_dir() / "corpus" / CORPUS_VERSION


def tokenizer_dir() -> Path:
    return cache_dir() / "tokenizer" / CORPUS_VERSION


def models_dir() -> Path:
    return cache_dir() / "models"
