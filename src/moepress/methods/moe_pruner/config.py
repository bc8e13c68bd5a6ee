from __future__ import annotations

from dataclasses import dataclass, field

from ...ops.moe_pruner import parse_pattern
from ..base import ConfigError, MethodConfig


@dataclass
class MoEPrunerConfig(MethodConfig):
    """MoE-Pruner options (docs/algorithms.md#moe_pruner). `ratio` = fraction of routed-expert weights zeroed."""

    pattern: str = field(default="unstructured", metadata={
        "help": "unstructured: per output row drop the lowest scores; N:M (e.g. 2:4): keep the N best "
                "of every M consecutive inputs (ratio is then (M-N)/M)"})

    def __post_init__(self):
        super().__post_init__()
        if self.experts is not None:
            raise ConfigError("moe_pruner keeps every expert and zeroes weights: give --ratio, not --experts")
        if isinstance(self.pattern, int) and not isinstance(self.pattern, bool):
            # YAML 1.1 (the CLI's --opt values) reads "2:4" as the base-60 integer 2*60 + 4 = 124
            self.pattern = f"{self.pattern // 60}:{self.pattern % 60}"
        try:
            nm = parse_pattern(str(self.pattern))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if nm is None:
            if self.ratio is None:
                raise ConfigError("moe_pruner needs --ratio (fraction of routed-expert weights zeroed, 0-1)")
            return
        implied = (nm[1] - nm[0]) / nm[1]
        if self.ratio is None:
            self.ratio = implied
        elif abs(float(self.ratio) - implied) > 1e-9:
            raise ConfigError(f"pattern {self.pattern} zeroes {implied:g} of the weights; "
                              f"--ratio {self.ratio} contradicts it (omit --ratio or give {implied:g})")

    @property
    def n_m(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)
