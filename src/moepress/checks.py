"""Checks on what a user hands in, made before any heavy import (no torch here).

The CLI calls these first, so `moepress compress` with a wrong argument answers in a fraction of a
second and before any progress bar; the API calls the same functions, so Python callers get the
same messages. Every error is an `InputError` (a `ValueError`) whose message says what is allowed.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import NamedTuple

DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class InputError(ValueError):
    """Something the user gave is unusable; the message names it and says what is allowed."""


class ModelNotFoundError(FileNotFoundError, InputError):
    """The model argument names no local directory and no reachable hub id."""


class ExportError(InputError):
    """The output location is unusable (e.g. it is the source model); the message says why."""


class OutputDir(NamedTuple):
    """An output location that `check_output_dir` accepted (resolved path, overwrite allowed)."""

    path: Path
    overwrite: bool


def check_output_dir(out: str | Path, source: str | Path | None, overwrite: bool) -> OutputDir:
    """Refuse to write over the source model, and over an existing directory unless `overwrite`."""
    out = Path(out).expanduser().resolve()
    if source is not None and Path(str(source)).expanduser().exists():
        src = Path(str(source)).expanduser().resolve()
        if out == src:
            raise ExportError(f"output {out} is the source model; choose another --out")
        if out.is_relative_to(src):
            raise ExportError(f"output {out} is inside the source model {src}, which is never written to; "
                              f"choose an --out outside it")
        if overwrite and src.is_relative_to(out):
            raise ExportError(f"--overwrite of {out} would delete the source model {src} inside it; "
                              f"choose another --out")
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is a file; --out must be a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"output {out} exists and is not empty; pass --overwrite to replace it")
    return OutputDir(out, bool(overwrite))


def check_model_source(model: str | Path) -> None:
    """A model argument is an existing model directory, or a hub id that can be reached.

    Raises `InputError`: a path that does not exist, a directory without config.json, a file, or
    (with HF_HUB_OFFLINE=1) a hub id, which cannot be downloaded offline."""
    text = str(model)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"model directory {text!r} has no config.json: not a transformers model directory")
        return
    if path.exists():
        raise InputError(f"model {text!r} is a file; give the model's directory (the one holding config.json)")
    looks_like_hub_id = bool(_HUB_ID.fullmatch(text)) and not text.startswith((".", "~"))
    if not looks_like_hub_id:
        raise ModelNotFoundError(f"model directory {text!r} does not exist")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelNotFoundError(f"model {text!r} is not a local directory, and as a hub id it cannot be downloaded: "
                         f"the hub is offline (HF_HUB_OFFLINE=1)")


def model_type_of(model: str | Path) -> str | None:
    """`model_type` from a local model directory's config.json (None for a hub id)."""
    config = Path(str(model)).expanduser() / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise InputError(f"{config} is not readable JSON ({exc})") from None


def check_ratio(ratio: float | None, experts: int | None) -> None:
    """--ratio in (0, 1): 0 removes nothing (nothing to compress), 1 removes everything."""
    if ratio is not None and not 0.0 < float(ratio) < 1.0:
        hint = "; 0 would remove nothing, so there is nothing to compress" if float(ratio) == 0 else ""
        raise InputError(f"--ratio must be in (0, 1), got {ratio}{hint}")
    if experts is not None and int(experts) < 1:
        raise InputError(f"--experts must be >= 1, got {experts}")


def check_positive(**values: int | None) -> None:
    """Each given count is >= 1 (None = not given)."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def check_dtype(name: str) -> str:
    """A --dtype value: auto (the source's dtype) or one of the floating types an output can hold."""
    if name not in DTYPE_NAMES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}; got {name!r}")
    return name


def check_calibration_source(calib: str | None) -> None:
    """A calibration file / folder that exists (None = the built-in text)."""
    if calib is not None and not Path(calib).expanduser().exists():
        raise InputError(f"calibration source {calib!r} does not exist (give a text file, folder, .jsonl "
                         f"or a saved dataset; omit --calib for the built-in text)")


def method_package_names() -> list[str]:
    """Names of the method packages under methods/ (one per registered method), without importing them."""
    folder = Path(__file__).parent / "methods"
    return sorted(p.name for p in folder.iterdir() if (p / "__init__.py").is_file())


def check_method_name(name: str) -> None:
    names = method_package_names()
    if name not in names:
        raise InputError(f"unknown method {name!r}; available: {', '.join(names)}")


def check_safetensors_files(directory: str | Path) -> None:
    """Every `*.safetensors` file of a model directory is whole: its header parses and its tensors'
    byte ranges end exactly at the end of the file (a truncated download or copy fails here, with the
    file's name, instead of deep inside a loader). Reads only the headers."""
    folder = Path(str(directory)).expanduser()
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.safetensors")):
        size = path.stat().st_size
        with path.open("rb") as fh:
            prefix = fh.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            ok = 0 <= length <= size - 8
            header = fh.read(length) if ok else b""
        try:
            entries = json.loads(header) if ok else None
        except ValueError:
            entries = None
        if not isinstance(entries, dict):
            raise InputError(f"{path} is damaged or truncated (its header is incomplete); copy or download it again")
        ends = [int(v["data_offsets"][1]) for k, v in entries.items() if k != "__metadata__"]
        if max(ends, default=0) != size - 8 - length:
            raise InputError(f"{path} is damaged or truncated ({size - 8 - length} data bytes, its header lists "
                             f"{max(ends, default=0)}); copy or download it again")
