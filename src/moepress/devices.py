"""Where moepress computes: `--device auto|cpu|cuda|cuda:N` and `device=` in the API.

`resolve_device` is the one place a device name is checked, before any model is read, so a
request for a GPU that is not there fails at once with a one-line message. Under `torchrun`,
"cuda" and "auto" mean this rank's GPU (`LOCAL_RANK`).
"""

from __future__ import annotations

import torch

from . import distributed

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


class DeviceError(ValueError):
    """A device that cannot be used here; the message says what can."""


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """`auto` -> this rank's GPU if torch sees one, else the CPU; `cpu`; `cuda` / `cuda:N` checked.

    Raises DeviceError (one line) for an unknown name, for `cuda` without a visible GPU, and for
    an index past the GPUs there are."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    name = (spec or "auto").strip().lower()
    if name == "auto":
        return _cuda(None) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        index = name.partition(":")[2]
        if index and not index.isdigit():
            raise DeviceError(f"device {spec!r}: the GPU index must be a number ({DEVICE_CHOICES})")
        if not torch.cuda.is_available():
            raise DeviceError(f"device {spec!r}: no GPU visible to torch; use --device cpu or auto")
        return _cuda(int(index) if index else None)
    raise DeviceError(f"unknown device {spec!r}; use {DEVICE_CHOICES}")


def _cuda(index: int | None) -> torch.device:
    count = torch.cuda.device_count()
    index = distributed.local_rank() if index is None else index
    if index >= count:
        raise DeviceError(f"GPU {index} asked for, but torch sees {count} GPU(s) (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)
