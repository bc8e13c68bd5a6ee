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


# The choices of run options, here so that the CLI checks them before torch loads and every floor
# reads one tuple. PROPAGATIONS: whose hidden states feed the next layer during calibration (the
# compressed model's or the original's); HIDDEN_PLACEMENTS: where they wait between layers;
# QUANTIZE_CHOICES: the weight-only schemes of `--quantize` (tests/test_quantize.py keeps them equal
# to modeling.moepress_quant.SCHEMES).
PROPAGATIONS = ("compressed", "original")
HIDDEN_PLACEMENTS = ("auto", "cpu", "device")
QUANTIZE_CHOICES = ("none", "int8", "fp8")


class InputError(ValueError):
    """Something the user gave is unusable; the message names it and says what is allowed."""


class ModelNotFoundError(FileNotFoundError, InputError):
    """The model argument names no local directory and no reachable hub id."""


class ConfigError(InputError):
    """A method or run option out of range or inconsistent; the message says what is allowed."""


class ExportError(InputError):
    """The output location is unusable (e.g. it is the source model); the message says why."""


class DamagedSourceError(InputError):
    """The source checkpoint itself is unusable (e.g. NaN weights): rerunning fails the same way
    until the source is repaired; the message names the tensor and file."""


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
    """A calibration file / folder that exists (None = the built-in text); a file must be text."""
    if calib is None:
        return
    path = Path(calib).expanduser()
    if not path.exists():
        raise InputError(f"calibration source {calib!r} does not exist (give a text file, folder, .jsonl "
                         f"or a saved dataset; omit --calib for the built-in text)")
    if path.is_file():
        problem = text_file_problem(path)
        if problem is not None:
            raise InputError(f"calibration file {path} {problem}")


TEXT_SNIFF_BYTES = 1 << 16


def text_file_problem(path: str | Path) -> str | None:
    """Why `path` is not a UTF-8 text file, judged on its first 64 KiB (NUL bytes, or bytes that are
    not UTF-8), or None when it is text. Later invalid bytes are left to the reader (replaced)."""
    import codecs

    with Path(path).open("rb") as fh:
        head = fh.read(TEXT_SNIFF_BYTES)
    nul = head.find(b"\0")
    if nul >= 0:
        return (f"is not text (it holds NUL bytes, the first at byte {nul}: a binary file); give a UTF-8 "
                f"text file, a .jsonl/.json file, a folder of them or a saved dataset")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < TEXT_SNIFF_BYTES)
    except UnicodeDecodeError as exc:
        return (f"is not UTF-8 text (byte {exc.start} is {head[exc.start]:#04x}); convert it to UTF-8 "
                f"(e.g. iconv -f latin1 -t utf-8) or give another file")
    return None


def method_package_names() -> list[str]:
    """Names of the method packages under methods/ (one per registered method), without importing them."""
    folder = Path(__file__).parent / "methods"
    return sorted(p.name for p in folder.iterdir() if (p / "__init__.py").is_file())


def check_method_name(name: str) -> None:
    names = method_package_names()
    if name not in names:
        raise InputError(f"unknown method {name!r}; available: {', '.join(names)}")


# method -> the custom block kind it installs, for methods whose blocks `--quantize` cannot hold
# (quantization.QUANTIZABLE lists the block kinds it can; methods declare no output block kind yet,
# so this table stands in for that declaration; tests/test_bad_input.py keeps it in step with
# modeling's BLOCK_KINDS).
UNQUANTIZABLE_BLOCKS = {"compressed_experts": "compressed_experts", "moe_i2": "lowrank"}


def check_method_quantize(method: str, scheme: str | None) -> None:
    """Refuse `--quantize` for a method whose output blocks it cannot hold, before any work (it was
    only found after the whole compression)."""
    if scheme in (None, "none") or method not in UNQUANTIZABLE_BLOCKS:
        return
    quantizable = sorted(set(method_package_names()) - set(UNQUANTIZABLE_BLOCKS))
    raise InputError(f"--quantize {scheme} cannot quantize the {UNQUANTIZABLE_BLOCKS[method]!r} blocks method "
                     f"{method!r} writes; quantize with one of {', '.join(quantizable)}, or run {method} "
                     f"with --quantize none")


def check_report_dir(out: str | Path, source: str | Path | None) -> None:
    """A folder for reports (bench) is neither the source model nor inside it (never written to)."""
    if source is None or not Path(str(source)).expanduser().exists():
        return
    out, src = Path(out).expanduser().resolve(), Path(str(source)).expanduser().resolve()
    if out == src or out.is_relative_to(src):
        raise ExportError(f"--out {out} is inside the source model {src}, which is never written to; "
                          f"choose an --out outside it")


def safetensors_header(path: str | Path) -> dict:
    """The JSON header of one safetensors file (8-byte little-endian length, then the header): every
    tensor's dtype, shape and data offsets, without reading any tensor. OSError / ValueError when the
    file cannot be read or is not safetensors."""
    with Path(path).open("rb") as fh:
        return json.loads(fh.read(int.from_bytes(fh.read(8), "little")))


def safetensors_data_bytes(path: str | Path) -> int:
    """Bytes of tensor data in one safetensors file: the file less its 8-byte length and its header."""
    path = Path(path)
    with path.open("rb") as fh:
        return path.stat().st_size - 8 - int.from_bytes(fh.read(8), "little")


def safetensors_keys(directory: str | Path) -> dict[str, str]:
    """`{tensor name: file name}` of a model directory's safetensors files, from their headers only
    ({} for anything that is not a local model directory)."""
    folder = Path(str(directory)).expanduser()
    out: dict[str, str] = {}
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("*.safetensors")):
        try:
            header = safetensors_header(path)
        except (OSError, ValueError):
            continue
        out.update({key: path.name for key in header if key != "__metadata__"})
    return out


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
