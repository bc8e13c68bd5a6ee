"""Saving results: a stock checkpoint when the method allows it, custom auto_map code otherwise.

Output is written into a temporary sibling directory and renamed into place at the end, so an
interrupted save never leaves a half-written checkpoint under the requested name, and the source
model directory is never written to.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from torch import nn

from .arch import decoder_layers, family_of
from .modeling import MODELING_DIR, MODELING_FILES

RECORD_NAME = "moepress.json"
_VERSIONED = ("moepress", "torch", "transformers", "safetensors", "accelerate", "numpy", "scipy")


class ExportError(ValueError):
    """The output location is unusable (e.g. it is the source model); the message says why."""


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def custom_layers(model: nn.Module) -> dict[str, dict]:
    """`{layer index: block.layer_config()}` for every installed moepress custom block."""
    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        block = getattr(layer, "mlp", None)
        if getattr(block, "is_moepress_block", False):
            out[str(i)] = block.layer_config()
    return out


def _prepare_custom_config(model: nn.Module, method_name: str) -> None:
    from .modeling.modeling_moepress import class_name_for

    spec = family_of(model)
    model.config.moepress = {"format": 1, "method": method_name, "layers": custom_layers(model)}
    model.config.auto_map = {"AutoModelForCausalLM": f"modeling_moepress.{class_name_for(spec.model_type)}"}
    model.config.architectures = [class_name_for(spec.model_type)]


def check_output_dir(out: Path, source: str | Path | None, overwrite: bool) -> None:
    """Refuse to write over the source model, and over an existing directory unless `overwrite`."""
    out = Path(out).expanduser().resolve()
    if source is not None and Path(str(source)).expanduser().exists():
        if out == Path(str(source)).expanduser().resolve():
            raise ExportError(f"output {out} is the source model; choose another --out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"output {out} exists and is not empty; pass --overwrite to replace it")


def save_checkpoint(model: nn.Module, out: str | Path, *, method_name: str, export: str, record: dict,
                    tokenizer=None, source: str | Path | None = None, overwrite: bool = False,
                    store=None) -> Path:
    """Write `model` (+ tokenizer, modeling code when custom, moepress.json) to `out` atomically.

    `store`: the `StreamingLayers` of a bounded-memory run, whose finished layer shards are moved
    in (the model's layers are then on the meta device); None = `save_pretrained`.
    """
    out = Path(out).expanduser().resolve()
    check_output_dir(out, source, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        if export == "custom":
            _prepare_custom_config(model, method_name)
            for name in MODELING_FILES:
                shutil.copy2(MODELING_DIR / name, tmp / name)
        if store is not None:
            from .streaming import write_streamed_checkpoint

            write_streamed_checkpoint(model, store, tmp)
        elif export == "custom":
            # Fused keys: the custom blocks' tensors are not in transformers' per-expert conversion table.
            model.save_pretrained(tmp, save_original_format=False)
        else:
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2, default=str) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_record(path: str | Path) -> dict | None:
    p = Path(path) / RECORD_NAME
    return json.loads(p.read_text()) if p.exists() else None
