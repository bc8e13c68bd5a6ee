from __future__ import annotations

from dataclasses import dataclass, field

from ..base import ConfigError
from ..merging_common import MergingConfig


@dataclass
class MergeMoEConfig(MergingConfig):
    similarity: str = field(default="cosine", metadata={
        "help": "similarity of flattened [W_U; W_G] joining experts to the top-M-frequency centres: cosine|l2"})
    tokens: str = field(default="routed", metadata={
        "help": "tokens forming X̂ of a cluster's least squares: routed (tokens whose top-k holds a member; "
                "the inputs the merged expert will see) | all (every calibration token)"})
    solver: str = field(default="pinv", metadata={"help": "pinv (the paper's pseudo-inverse) | ridge"})
    ridge: float = field(default=1e-4, metadata={"help": "ridge λ relative to mean diag(P Pᵀ) (solver=ridge)"})
    down: str = field(default="lstsq", metadata={
        "help": "lstsq (MergeMoE Eq. 6) | average (T1 = stacked identities: M-SMoE's weighted average)"})

    def __post_init__(self):
        super().__post_init__()
        for name, allowed in (("similarity", ("cosine", "l2")), ("tokens", ("routed", "all")),
                              ("solver", ("pinv", "ridge")), ("down", ("lstsq", "average"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.ridge < 0:
            raise ConfigError(f"ridge must be >= 0, got {self.ridge}")
