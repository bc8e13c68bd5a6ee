from __future__ import annotations

from dataclasses import dataclass, field

from ..base import ConfigError
from ..merging_common import MergingConfig

SIMILARITIES = ("router-logits", "weight")


@dataclass
class MSMoEConfig(MergingConfig):
    similarity: str = field(default="router-logits", metadata={
        "help": "how non-dominant experts pick their dominant expert: router-logits (paper default)|weight"})
    align: bool = field(default=True, metadata={
        "help": "permute each member's neurons onto its dominant expert (Hungarian) before averaging"})

    def __post_init__(self):
        super().__post_init__()
        if self.similarity not in SIMILARITIES:
            raise ConfigError(f"similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
