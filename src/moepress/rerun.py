"""Replaying a recorded run: `moepress compress --replay OUT/moepress.json --out NEW` (issue 20).

A `moepress.json` record holds everything that decides a compression's numbers: the source, the
method and its whole resolved config, the calibration (source, sequences, length, seed and, since
records carry it, the SHA-256 of the packed token ids), batch size, propagation, dtype, layer
selection, budget, quantization, offload, device kind and data-parallel world size. `arguments`
turns it back into `moepress.compress` arguments; `check_replayed` compares what the replay
actually used with what was recorded, so a replay that would not reproduce the run (the calibration
text changed, another world size) is an error before anything is written, not a silent difference.

Not replayed: a `moepress finetune` stage recorded on top (replay the compression, then run the
same `finetune` command), and `moepress quantize` records (rerun `moepress quantize` itself).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .checks import InputError
from .record import RECORD_NAME

def read(path: str | Path) -> dict:
    """The record at `path` (a `moepress.json` file or the checkpoint folder holding one)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / RECORD_NAME
    if not path.is_file():
        raise InputError(f"--replay {path}: no such record (give a checkpoint's moepress.json)")
    try:
        record = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"--replay {path}: not a moepress.json record ({exc})") from None
    if not isinstance(record, dict) or record.get("moepress_record") != 1 or "method" not in record:
        raise InputError(f"--replay {path}: not a moepress.json record of a compression")
    if record.get("quantized_from") and record.get("method") == "quantize":
        raise InputError(f"--replay {path}: a `moepress quantize` record; rerun `moepress quantize "
                         f"{record['quantized_from']} --scheme {record['quantization']['scheme']}` instead")
    return record


def arguments(record: dict) -> dict:
    """`moepress.compress` keyword arguments (model and method included) that redo `record`'s run."""
    config = dict(record.get("config") or {})
    calib = record.get("calibration")
    selection = record.get("layer_selection") or {}
    budget = record.get("budget") or {}
    quant = record.get("quantization")
    propagation = record.get("propagation")
    args = {
        "model": record["source_model"],
        "method": record["method"],
        "ratio": config.pop("ratio", None),
        "experts": config.pop("experts", None),
        "seed": record.get("seed", 0),
        "batch_size": record.get("batch_size", 8),
        "dtype": record.get("dtype", "auto"),
        "layers": selection.get("spec"),
        "budget": budget.get("mode", "uniform"),
        "budget_floor": budget.get("floor") if budget.get("mode") == "auto" else None,
        "quantize": quant["scheme"] if isinstance(quant, dict) else "none",
        "propagate": propagation if propagation in ("original", "compressed") else None,
        "device": record.get("device", "auto"),
        **config,
    }
    if "offload" in record:
        args["offload"] = bool(record["offload"])
    if isinstance(calib, dict):
        source = calib.get("source")
        args["calib"] = None if source == "builtin:calib" else source
        # sequences used == samples asked: fewer than available means they were drawn with this
        # count and seed; all available means any count >= it takes them all, in order
        generated = int(calib.get("generated") or 0)  # sampled from the model, after the text's sequences
        args["samples"] = calib["sequences"] - generated
        args["seq_len"] = calib["seq_len"]
        if generated:
            args["calib_generated"] = generated
    if not args["model"]:
        raise InputError("this record names no source model (it was compressed from a model object): "
                         "replay it through the API with the same object")
    return args


def check_world_size(record: dict) -> None:
    """A data-parallel run sums its statistics over its ranks: it reproduces bit for bit only with
    the same number of ranks (and one process only as one process)."""
    recorded = int(record.get("world_size") or 1)
    current = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if recorded != current:
        how = (f"torchrun --nproc_per_node={recorded} -m moepress compress --replay ..." if recorded > 1
               else "one process (without torchrun)")
        raise InputError(f"this run was recorded with {recorded} rank(s) and is replayed with {current}: "
                         f"sums over ranks would differ in their last bits; replay it with {how}")


def check_replayed(record: dict, replayed: dict) -> None:
    """The replay used the recorded calibration tokens (same SHA-256) and method config; else an
    error naming what differs (raised before the replay's result is saved)."""
    old, new = record.get("calibration") or {}, replayed.get("calibration") or {}
    if old.get("token_sha256") and old.get("token_sha256") != new.get("token_sha256"):
        raise InputError(f"replay: the calibration tokens differ from the recorded run's ({old.get('source')} "
                         f"changed, or another tokenizer): nothing was written")
    if (record.get("config") or {}) != (replayed.get("config") or {}):
        changed = sorted(k for k in set(record["config"]) | set(replayed["config"])
                         if record["config"].get(k) != replayed["config"].get(k))
        raise InputError(f"replay: the method config differs from the record in {', '.join(changed)} "
                         f"(another moepress version?): nothing was written")


def replay(path: str | Path, *, out: str | Path | None = None, overwrite: bool = False, progress=None, log=None):
    """Redo the compression recorded at `path` (API of `moepress compress --replay`): returns the
    `CompressionResult`, checked against the record (`check_replayed`); save it as any result.
    The statistics cache and offload follow the record's run; stats cache hits are bit for bit the
    values the run computes (run/cache_keys.py), so they cannot make a replay differ."""
    from .api import compress

    record = read(path)
    check_world_size(record)
    result = compress(**arguments(record), out=out, overwrite=overwrite, progress=progress, log=log)
    check_replayed(record, result.record)
    result.record["replay_of"] = str(Path(path).expanduser().resolve())
    return result
