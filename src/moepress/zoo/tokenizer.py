"""Byte-level BPE tokenizer trained on the corpus train split, saved for ``AutoTokenizer``."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .corpus import TRAIN_DOMAINS, read_split
from .paths import tokenizer_dir

EOS = "<|endoftext|>"
PAD = "<pad>"
VOCAB_SIZE = 4096
#: Characters per domain fed to the BPE trainer, so small domains (French, code) get merges too.
CHARS_PER_DOMAIN = 3_000_000


def train_bpe(texts: Iterable[str], vocab_size: int = VOCAB_SIZE, out: Path | None = None):
    """Train a byte-level BPE on ``texts``; returns a transformers fast tokenizer (saved if ``out``).

    The result loads back with ``AutoTokenizer.from_pretrained(out)``: ``<|endoftext|>`` is
    bos/eos/unk, ``<pad>`` pads.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=PAD)
    wrapped.model_max_length = 1 << 20
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        wrapped.save_pretrained(str(out))
    return wrapped


def _balanced_train_texts(chars_per_domain: int = CHARS_PER_DOMAIN):
    for domain in TRAIN_DOMAINS:
        used = 0
        for doc in read_split(domain, "train"):
            if used >= chars_per_domain:
                break
            used += len(doc["text"])
            yield doc["text"]


def build_tokenizer(force: bool = False) -> Path:
    """Train (once) the zoo tokenizer on the corpus train split; returns its directory."""
    out = tokenizer_dir()
    if (out / "tokenizer.json").exists() and not force:
        return out
    train_bpe(_balanced_train_texts(), out=out)
    return out
