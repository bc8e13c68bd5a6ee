"""The one loader: every command and API call that opens a model or a tokenizer comes here.

`compress`, `load`, `evaluate`, `inspect`, `bench`, the zoo's report and fine-tuning all use
`load_pretrained`; a bounded-memory run opens the model layer by layer instead
(`layer_store.open_streaming`) and takes its tokenizer from `load_tokenizer`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn


def load(path: str | Path, dtype: torch.dtype | str | None = torch.float32) -> nn.Module:
    """Load a model directory or hub id in eval mode.

    moepress outputs with custom blocks load as moepress's own classes, without
    `trust_remote_code`; stock models and stock results load as the stock transformers class.
    """
    import transformers

    _require_reachable(path)
    config = transformers.AutoConfig.from_pretrained(str(path))
    if getattr(config, "moepress", None):
        from .modeling import modeling_moepress

        cls = getattr(modeling_moepress, modeling_moepress.class_name_for(config.model_type))
        return cls.from_pretrained(str(path), dtype=dtype).eval()
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def load_tokenizer(source, tokenizer=None, required: bool = True):
    """The tokenizer to use with `source` (a path, hub id or model object).

    Args:
        tokenizer: a tokenizer object (returned as is), a path or hub id, or None for the one
            saved beside the model (`source`'s directory, or a model object's `name_or_path`).
        required: when False, a source without a tokenizer gives None instead of an error
            (for work that reads no text, e.g. a method that needs no calibration).
    """
    import transformers

    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    name = tokenizer if tokenizer is not None else _source_name(source)
    if not name:
        if not required:
            return None
        raise ValueError("this model object has no name_or_path to find its tokenizer: pass tokenizer=")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(name))
    except (OSError, ValueError):
        if required:
            raise
        return None


def load_pretrained(source, *, dtype: torch.dtype | str | None = torch.float32, tokenizer=None,
                    require_tokenizer: bool = True) -> tuple[nn.Module, object]:
    """`(model, tokenizer)` from a model directory, hub id or model object.

    A model object is returned as it is (same object, mode unchanged); a path or hub id is
    loaded with `load` in `dtype`. The tokenizer follows `load_tokenizer(source, tokenizer,
    require_tokenizer)`.
    """
    model = load(source, dtype) if isinstance(source, (str, Path)) else source
    return model, load_tokenizer(source, tokenizer, required=require_tokenizer)


def _source_name(source) -> str | None:
    if isinstance(source, (str, Path)):
        return str(source)
    return getattr(source, "name_or_path", None) or None


def _require_reachable(path: str | Path) -> None:
    """A clear error for a name that is neither a local directory nor reachable (offline hub)."""
    if not Path(str(path)).expanduser().exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(f"model {str(path)!r} is not a local directory and the hub is offline "
                                f"(HF_HUB_OFFLINE=1)")
