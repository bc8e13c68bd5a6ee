"""Tokenise calibration documents and pack them into fixed-length sequences.

Documents are joined with the tokenizer's EOS token and cut into consecutive windows of
`seq_len` tokens; a trailing partial window is dropped, so no padding token ever exists and no
statistic can see one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .sources import CalibrationError, load_texts


@dataclass
class CalibrationSet:
    """Packed calibration tokens `input_ids [n, seq_len]` and where they came from (the last
    `generated` rows sampled from the model itself: `calib.generated`)."""

    input_ids: torch.Tensor
    source: str
    seed: int
    available_sequences: int
    generated: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def batches(self, batch_size: int):
        for i in range(0, self.input_ids.shape[0], batch_size):
            yield self.input_ids[i : i + batch_size]

    def describe(self) -> dict:
        n, seq_len = self.input_ids.shape
        digest = hashlib.sha256(self.input_ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
        return {"source": self.source, "sequences": n, "seq_len": seq_len, "tokens": n * seq_len,
                "seed": self.seed, "available_sequences": self.available_sequences, "generated": self.generated,
                "token_sha256": digest}  # `--replay` checks it: the same tokens, or an error


def pack_token_ids(docs: list[list[int]], seq_len: int, eos_id: int | None) -> torch.Tensor:
    """Concatenate documents (EOS between them) and cut into `[n, seq_len]` windows."""
    flat: list[int] = []
    for ids in docs:
        flat.extend(ids)
        if eos_id is not None:
            flat.append(eos_id)
    n = len(flat) // seq_len
    return torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len)


def build_calibration(tokenizer, source=None, samples: int = 128, seq_len: int = 2048, seed: int = 0,
                      text_field: str = "text") -> CalibrationSet:
    """`samples` packed sequences of `seq_len` tokens from `source`, chosen with `seed`.

    When the source holds fewer sequences than asked, all of them are used (the count is recorded);
    when it holds none, the error says how many tokens are needed.
    """
    if samples < 1 or seq_len < 2:
        raise CalibrationError(f"need samples >= 1 and seq_len >= 2 (got {samples}, {seq_len})")
    texts = load_texts(source, text_field)
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    packed = pack_token_ids(encoded, seq_len, tokenizer.eos_token_id)
    if packed.shape[0] == 0:
        total = sum(len(e) for e in encoded)
        raise CalibrationError(
            f"calibration source gives {total} tokens, fewer than one sequence of --seq-len {seq_len}; "
            f"give more text or a smaller --seq-len"
        )
    available = packed.shape[0]
    if available > samples:
        gen = torch.Generator().manual_seed(seed)
        packed = packed[torch.randperm(available, generator=gen)[:samples].sort().values]
    name = "builtin:calib" if source is None else str(source)
    return CalibrationSet(packed, name, seed, available)
