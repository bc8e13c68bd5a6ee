"""Saving results: a stock checkpoint when the method allows it, custom auto_map code otherwise.

Output is written into a temporary sibling directory and renamed into place at the end, so an
interrupted save never leaves a half-written checkpoint under the requested name, and the source
model directory is never written to. The `moepress.json` record is written once, inside that
temporary directory, so a checkpoint never exists without its record, and with it the model card
(`README.md`, `model_card.py`) read from that record.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from safetensors.torch import save_file
from torch import nn

from .arch import decoder_layers, family_of
from .checks import ExportError, OutputDir, check_output_dir, safetensors_data_bytes  # noqa: F401 (re-exported)
from .modeling import MODELING_DIR, MODELING_FILES
from .modeling.modeling_moepress import class_name_for, describe_block
from .modeling.moepress_layout import to_hub_layout, use_hub_layout_on_save
from .model_card import model_card
from .record import stage_figures, write_record


def custom_layers(model: nn.Module) -> dict[str, dict]:
    """`{layer index: block.layer_config()}` for every installed moepress custom block, and
    `{"kind": "experts", "num_experts": m}` for every stock MoE block whose expert count differs
    from the config's (per-layer counts: modeling/moepress_experts.py)."""
    spec = family_of(model)
    described = ((i, describe_block(spec.block_of(layer), model.config)) for i, layer in enumerate(decoder_layers(model)))
    return {str(i): info for i, info in described if info is not None}


def _prepare_custom_config(model: nn.Module, method_name: str) -> None:
    spec = family_of(model)
    model.config.moepress = {"format": 1, "method": method_name, "layers": custom_layers(model)}
    model.config.auto_map = {"AutoModelForCausalLM": f"modeling_moepress.{class_name_for(spec.model_type)}"}
    model.config.architectures = [class_name_for(spec.model_type)]


def save_checkpoint(model: nn.Module, out: str | Path | OutputDir, *, method_name: str, export: str, record: dict,
                    tokenizer=None, source: str | Path | None = None, overwrite: bool = False,
                    store=None, timed_stage: str | None = None) -> Path:
    """Write `model` (+ tokenizer, modeling code when custom, moepress.json) to `out` atomically.

    Args:
        out: a directory, checked here against `source`/`overwrite`, or an `OutputDir` checked
            before the work began (then `overwrite` is the one given to that check).
        store: the `StreamingLayers` of a bounded-memory run, whose finished layer shards are moved
            in (the model's layers are then on the meta device); None = `save_pretrained`.
        timed_stage: when given, this save's seconds and peak memory, measured up to just before the
            record is written, go into `record["stages"][timed_stage]`.
    Returns: the checkpoint directory.
    """
    started = time.perf_counter()
    target = out if isinstance(out, OutputDir) else check_output_dir(out, source, overwrite)
    target.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.path.name}.partial-", dir=target.path.parent))
    try:
        _write_model(model, tmp, method_name, export, store)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if timed_stage is not None:
            record.setdefault("stages", {})[timed_stage] = stage_figures(started)
        write_record(tmp, record)
        (tmp / "README.md").write_text(model_card(record, target.path.name))
        _apply_umask(tmp)
        _replace(target, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the work shards are still there: the run resumes
        raise
    if store is not None:
        store.finish()  # only now: a save that dies before the rename loses no finished layer
    return target.path


def _write_model(model: nn.Module, tmp: Path, method_name: str, export: str, store) -> None:
    if export == "custom":
        _prepare_custom_config(model, method_name)
        for name in MODELING_FILES:
            shutil.copy2(MODELING_DIR / name, tmp / name)
    if store is not None:
        write_streamed_checkpoint(model, store, tmp)
    else:  # the family's hub layout, for stock and custom checkpoints alike (modeling/moepress_layout.py)
        use_hub_layout_on_save(model)
        model.save_pretrained(tmp)
        if export == "custom":
            # save_pretrained names the in-memory class (the stock one, with moepress blocks swapped in);
            # engines pick the model by `architectures`: it must name the moepress class
            _prepare_custom_config(model, method_name)
            model.config.save_pretrained(tmp)


def _replace(target: OutputDir, tmp: Path) -> None:
    """Rename `tmp` to the output; an old output goes only when overwriting was allowed."""
    if target.path.exists():
        if target.overwrite:
            shutil.rmtree(target.path)
        elif any(target.path.iterdir()):
            raise ExportError(f"output {target.path} was filled by something else during the run; "
                              f"pass --overwrite to replace it")
        else:
            target.path.rmdir()
    os.replace(tmp, target.path)


def write_streamed_checkpoint(model: nn.Module, store, tmp: Path) -> None:
    """The checkpoint of a bounded-memory run: the store's finished layer shards, moved into `tmp`
    under the family's hub names, plus one shard with everything else (embeddings, final norm, head),
    the index and the config."""
    from .run.store import LAYER_PREFIX

    rest = {}
    seen = set()
    for name, tensor in model.state_dict().items():
        if name.startswith(LAYER_PREFIX) or tensor.is_meta:
            continue
        if tensor.data_ptr() in seen:  # tied weights are stored once (transformers re-ties on load)
            continue
        seen.add(tensor.data_ptr())
        rest[name] = tensor.contiguous()
    rest = to_hub_layout(model, rest)
    save_file(rest, str(tmp / "model-rest.safetensors"), metadata={"format": "pt"})
    weight_map = {k: "model-rest.safetensors" for k in rest}
    weight_map.update(store.hand_over(tmp, lambda state: to_hub_layout(model, state)))
    total = sum(safetensors_data_bytes(tmp / name) for name in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    model.config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)


def _umask() -> int:
    """The process umask (read by setting it, then restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(directory: Path) -> None:
    """Give `directory` and everything in it the modes the user's umask asks for, as `save_pretrained`
    does: `mkdtemp` makes the directory owner-only and safetensors writes its files 0600, which on a
    shared server would hide the checkpoint from colleagues."""
    mask = _umask()
    os.chmod(directory, 0o777 & ~mask)
    for path in directory.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
