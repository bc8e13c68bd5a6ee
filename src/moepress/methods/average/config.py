from __future__ import annotations

from dataclasses import dataclass, field

from ..base import ConfigError
from ..merging_common import MergingConfig


@dataclass
class AverageConfig(MergingConfig):
    similarity: str = field(default="cosine", metadata={
        "help": "similarity of flattened [W_U; W_G] used to join experts to the top-M-frequency centres: cosine|l2"})

    def __post_init__(self):
        super().__post_init__()
        if self.similarity not in ("cosine", "l2"):
            raise ConfigError(f"similarity must be 'cosine' or 'l2', got {self.similarity!r}")
