"""The `moepress.json` record beside every checkpoint (docs/design.md#record): names, versions, stage figures.

The record is a plain dict built once by the code that produced the result (`api.compress`,
`api.finetune_checkpoint`) and written once, by `export.save_checkpoint`, inside the temporary
directory before the atomic rename.
"""

from __future__ import annotations

import json
import math
import platform
import resource
import time
from importlib import metadata
from pathlib import Path

RECORD_NAME = "moepress.json"
_VERSIONED = ("moepress", "torch", "transformers", "safetensors", "accelerate", "numpy", "scipy")


def library_versions() -> dict[str, str]:
    """Versions of Python and of the libraries that decide a result's numbers."""
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (VmHWM: ru_maxrss would include a parent's at fork)."""
    try:
        with open("/proc/self/status") as fh:
            hwm = next(line for line in fh if line.startswith("VmHWM"))
        return round(int(hwm.split()[1]) / 1024, 1)
    except (OSError, StopIteration):
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def stage_figures(started: float) -> dict:
    """`{"seconds", "peak_rss_mb"}` of a stage that began at `time.perf_counter()` value `started`."""
    return {"seconds": round(time.perf_counter() - started, 3), "peak_rss_mb": peak_rss_mb()}


def _finite(value):
    """`value` with every non-finite float replaced by None (strict JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def strict_json(data, indent: int = 2) -> str:
    """JSON that strict parsers accept: NaN/Infinity become null, other objects their `str`."""
    return json.dumps(_finite(json.loads(json.dumps(data, default=str))), indent=indent, allow_nan=False) + "\n"


def write_record(directory: Path, record: dict) -> Path:
    path = Path(directory) / RECORD_NAME
    path.write_text(strict_json(record))
    return path


def read_record(path: str | Path) -> dict | None:
    """The record of checkpoint directory `path`, or None if it has none (e.g. a stock model)."""
    p = Path(path) / RECORD_NAME
    return json.loads(p.read_text()) if p.exists() else None
