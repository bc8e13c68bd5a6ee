from __future__ import annotations

from dataclasses import dataclass, field

from ..base import MethodConfig


@dataclass
class ReapConfig(MethodConfig):
    """REAP options (docs/algorithms.md#reap)."""

    renormalize: bool | None = field(default=None, metadata={
        "help": "gate values: true = router scores renormalised over the top-k (REAP's flag), "
                "false = raw scores, unset = the model's own routing weights"})
