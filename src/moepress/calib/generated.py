"""Calibration text sampled from the model itself (our addition; the idea is LLM-QAT's data-free
distillation, Liu et al. 2023, §2.1: the model's own samples cover what it was trained on).

A user's calibration text is often one domain; a fit or a fine-tune on it bends the compressed
model toward that domain (issue 23: Compressed Experts calibrated on Linux docs only). Sequences
sampled from the uncompressed model follow the model's own distribution over every domain it
knows, so mixing them into the calibration text widens what the statistics and the fine-tune see
without any data the user does not have.

`sample_sequences` draws by plain ancestral sampling (temperature 1, no top-k/top-p: the model's
distribution, not its mode; inverse-CDF draws of uniforms fixed per sequence and position, so a
seed gives the same tokens in any batch size), starting every sequence from the BOS token (EOS when
the tokenizer has no BOS) and continuing past any EOS, as packed calibration windows do.
"""

from __future__ import annotations

import torch
from torch import nn

from .sources import CalibrationError


def start_token(tokenizer, config, vocab_size: int) -> int:
    """The token every sampled sequence starts from: BOS, else EOS, the first of them inside the
    vocabulary (a clear error if none is)."""
    for source in (tokenizer, config):
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(source, name, None) if source is not None else None
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if value is not None and 0 <= int(value) < vocab_size:
                return int(value)
    raise CalibrationError(f"sampling calibration text needs a BOS or EOS token id inside the vocabulary "
                           f"(0..{vocab_size - 1}); the tokenizer and config have none")


@torch.no_grad()
def sample_sequences(model: nn.Module, tokenizer, sequences: int, seq_len: int, *, seed: int = 0,
                     temperature: float = 1.0, batch_size: int = 16, progress=None,
                     start: torch.Tensor | None = None) -> torch.Tensor:
    """`[sequences, seq_len]` token ids sampled from `model` (module doc), on the model's device.

    `start`: the first token of each sequence `[sequences]` instead of BOS/EOS (e.g. the first
    tokens of real text, for a model whose tokenizer names neither).

    `progress(done_sequences)` is called after each batch. The model is put in eval mode and left so.
    """
    if sequences < 1 or seq_len < 2:
        raise CalibrationError(f"need sequences >= 1 and seq_len >= 2 to sample (got {sequences}, {seq_len})")
    if temperature <= 0:
        raise CalibrationError(f"sampling temperature must be > 0, got {temperature}")
    model.eval()
    device = next(model.parameters()).device
    if start is None:
        first = start_token(tokenizer, getattr(model, "config", None), model.get_input_embeddings().num_embeddings)
        start = torch.full((sequences,), first, dtype=torch.long)
    if start.shape != (sequences,):
        raise CalibrationError(f"start needs one token per sequence ({sequences}), got shape {tuple(start.shape)}")
    # one uniform draw per (sequence, position), fixed up front: the samples do not depend on batching
    uniform = torch.rand(sequences, seq_len, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    rows = []
    for start_row in range(0, sequences, batch_size):
        n = min(batch_size, sequences - start_row)
        ids = start[start_row:start_row + n].to(device=device, dtype=torch.long).unsqueeze(-1)
        out = model(input_ids=ids, use_cache=True)
        tokens = [ids]
        for t in range(1, seq_len):
            probs = torch.softmax(out.logits[:, -1].double() / temperature, dim=-1).cpu()
            cdf = probs.cumsum(dim=-1)  # inverse-CDF sampling: token = first index where cdf > u
            u = (uniform[start_row:start_row + n, t] * cdf[:, -1]).unsqueeze(-1)
            nxt = torch.searchsorted(cdf, u, right=True).clamp_max(probs.shape[-1] - 1).to(device)
            tokens.append(nxt)
            if len(tokens) == seq_len:
                break
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
        rows.append(torch.cat(tokens, dim=1))
        if progress is not None:
            progress(start_row + n)
    return torch.cat(rows).cpu()
