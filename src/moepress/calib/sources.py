"""Calibration text sources: a text file, a jsonl file, a folder of them, or a saved `datasets` dataset."""

from __future__ import annotations

import json
from pathlib import Path

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text"}


class CalibrationError(ValueError):
    """Bad calibration input; the message says what was expected."""


def _read_jsonl(path: Path, field: str) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or field not in row:
                raise CalibrationError(f"{path}:{lineno}: expected an object with a {field!r} field")
            texts.append(str(row[field]))
    return texts


def _read_file(path: Path, field: str) -> list[str]:
    from ..checks import text_file_problem

    problem = text_file_problem(path)  # a binary file would otherwise pass as replacement characters
    if problem is not None:
        raise CalibrationError(f"calibration file {path} {problem}")
    if path.suffix == ".jsonl":
        return _read_jsonl(path, field)
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, list):
            return [str(r[field]) if isinstance(r, dict) else str(r) for r in data]
        raise CalibrationError(f"{path}: expected a JSON list of texts or objects with {field!r}")
    # Plain text: documents separated by blank-line runs are kept whole; packing joins them.
    return [path.read_text(encoding="utf-8", errors="replace")]


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (
        path / "state.json"
    ).exists()


def _read_saved_dataset(path: Path, field: str) -> list[str]:
    try:
        import datasets  # lazy: optional dependency
    except ImportError:
        raise CalibrationError(f"{path} is a saved dataset; install moepress[data] to read it") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    if field not in ds.column_names:
        raise CalibrationError(f"dataset {path} has no {field!r} column; columns: {ds.column_names}")
    return [str(t) for t in ds[field]]


def load_texts(source: str | Path | None, text_field: str = "text") -> list[str]:
    """Documents from `source` (None = the shipped multi-domain calibration text).

    Accepts a .txt/.md/.rst/.py file (one document), a .jsonl/.json file (`text_field` per row),
    a folder (every such file inside, sorted), or a folder written by `datasets.save_to_disk`.
    """
    if source is None:
        from ..resources import builtin_text  # the shipped multi-domain calibration text

        return [builtin_text("calib")]
    path = Path(source).expanduser()
    if not path.exists():
        raise CalibrationError(f"calibration source {str(source)!r} does not exist")
    if path.is_dir():
        if _is_saved_dataset(path):
            return _read_saved_dataset(path, text_field)
        files = sorted(p for p in path.rglob("*") if p.is_file() and (p.suffix in TEXT_SUFFIXES | {".jsonl", ".json"}))
        if not files:
            raise CalibrationError(f"folder {path} holds no .txt/.md/.jsonl/.json files")
        texts = [t for f in files for t in _read_file(f, text_field)]
    else:
        texts = _read_file(path, text_field)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise CalibrationError(f"calibration source {path} contains no text")
    return texts
