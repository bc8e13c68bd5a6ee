from __future__ import annotations

from dataclasses import dataclass, field

from ..base import ConfigError, MethodConfig


@dataclass
class NaeeConfig(MethodConfig):
    """NAEE options (docs/algorithms.md#naee)."""

    max_subsets: int = field(default=5000, metadata={
        "help": "enumerate all C(N, M) subsets up to this many; above it use greedy backward elimination"})
    max_tokens: int = field(default=8192, metadata={
        "help": "calibration tokens used for the reconstruction loss (expert outputs of all experts on "
                "them are held in memory: N x tokens x hidden floats)"})

    def __post_init__(self):
        super().__post_init__()
        if self.max_subsets < 1 or self.max_tokens < 1:
            raise ConfigError("naee: max_subsets and max_tokens must be >= 1")
