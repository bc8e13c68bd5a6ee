"""Shared fixtures: a tiny BPE tokenizer and calibration text made offline from the stdlib sources."""

from __future__ import annotations

import inspect
import json
import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# compress() keeps calibration statistics in a cache by default: the tests' own, not the user's
if "MOEPRESS_STATS_CACHE" not in os.environ:
    os.environ["MOEPRESS_STATS_CACHE"] = tempfile.mkdtemp(prefix="moepress-test-stats-")
    atexit.register(shutil.rmtree, os.environ["MOEPRESS_STATS_CACHE"], True)


def pytest_configure(config):
    """Tiny models gain nothing from intra-op threads, and OpenMP spinning on a busy 2-core
    machine made small eigh/SVD calls 10-20x slower: run the suite single-threaded."""
    import torch

    torch.set_num_threads(1)


def _stdlib_text() -> str:
    import argparse
    import textwrap

    return "\n\n".join(inspect.getsource(m) for m in (json, argparse, textwrap))


@pytest.fixture(scope="session")
def calib_text() -> str:
    return _stdlib_text()


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory, calib_text):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(calib_text)
    return path


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory, calib_text):
    """A byte-level BPE with 512 tokens (the tiny models' vocabulary), saved and reloaded."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([calib_text], trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    path = tmp_path_factory.mktemp("tokenizer")
    hf.save_pretrained(path)
    return transformers.AutoTokenizer.from_pretrained(path)


from moepress.arch import SUPPORTED as FAMILIES  # noqa: E402,F401


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer):
    """`tiny_checkpoint(family)` -> directory of a saved tiny random model + tokenizer (cached)."""
    from moepress.testing import tiny_model

    cache = {}

    def make(family: str):
        if family not in cache:
            path = tmp_path_factory.mktemp(f"tiny-{family}")
            tiny_model(family).save_pretrained(path)
            tokenizer.save_pretrained(path)
            cache[family] = path
        return cache[family]

    return make
