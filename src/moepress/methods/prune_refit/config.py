from __future__ import annotations

from dataclasses import dataclass, field

from ..base import ConfigError, MethodConfig


@dataclass
class PruneRefitConfig(MethodConfig):
    """Which pruning method chooses the kept experts, and how their down projections are refitted."""

    select: str = field(default="naee", metadata={
        "help": "registered pruning method that chooses the kept experts (naee | frequency | reap), "
                "with its default options"})
    ridge: float = field(default=0.1, metadata={
        "help": "ridge λ (relative to mean diag of the Gram) pulling each refitted down projection toward the "
                "kept expert's own; 0 = plain least squares, large = plain pruning"})
    sweeps: int = field(default=1, metadata={"help": "Gauss-Seidel sweeps over the kept experts"})

    def __post_init__(self):
        super().__post_init__()
        if self.ridge < 0:
            raise ConfigError(f"ridge must be >= 0, got {self.ridge}")
        if int(self.sweeps) < 1:
            raise ConfigError(f"sweeps must be >= 1, got {self.sweeps}")
