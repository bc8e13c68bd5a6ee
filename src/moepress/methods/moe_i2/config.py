from __future__ import annotations

from dataclasses import dataclass, field

from ..base import ConfigError, MethodConfig

ALLOCATIONS = ("importance", "uniform")


@dataclass
class MoEI2Config(MethodConfig):
    """MoE-I² options (docs/algorithms.md#moe_i2). `ratio` = fraction of routed-expert parameters removed."""

    expert_share: float = field(default=0.5, metadata={
        "help": "share of the removed parameters taken by stage 1 (expert pruning); the rest by "
                "stage 2 (low-rank). 1 = pruning only, 0 = low-rank only"})
    layer_allocation: str = field(default="importance", metadata={
        "help": "experts pruned per layer: importance (layers whose experts matter less lose more) | uniform"})
    rank_allocation: str = field(default="importance", metadata={
        "help": "ranks of the kept experts: importance (in proportion to each expert's removal loss) | uniform"})
    rank: int | None = field(default=None, metadata={
        "help": "fixed rank of every expert projection (overrides the ratio's stage-2 budget; "
                ">= min(hidden, intermediate) keeps the experts exact)"})
    whiten: bool = field(default=True, metadata={
        "help": "truncation-aware SVD whitened by each expert's routed inputs (SVD-LLM); false = plain SVD"})
    max_subsets: int = field(default=5000, metadata={
        "help": "stage-1 search enumerates all expert subsets up to this many; above it greedy elimination"})
    max_tokens: int = field(default=8192, metadata={
        "help": "calibration tokens per layer used by the stage-1 search losses (and the chunk of the "
                "importance pass); all N expert outputs on them are held in memory"})

    def __post_init__(self):
        super().__post_init__()
        if self.experts is not None:
            raise ConfigError("moe_i2 sets per-layer expert counts itself: give --ratio, not --experts")
        if self.ratio is None:
            raise ConfigError("moe_i2 needs --ratio (fraction of routed-expert parameters removed, 0-1)")
        if not 0.0 <= float(self.expert_share) <= 1.0:
            raise ConfigError(f"expert_share must be in [0, 1], got {self.expert_share}")
        for name in ("layer_allocation", "rank_allocation"):
            if getattr(self, name) not in ALLOCATIONS:
                raise ConfigError(f"{name} must be one of {ALLOCATIONS}, got {getattr(self, name)!r}")
        if self.rank is not None and int(self.rank) < 1:
            raise ConfigError(f"rank must be >= 1, got {self.rank}")
        if self.max_subsets < 1 or self.max_tokens < 1:
            raise ConfigError("moe_i2: max_subsets and max_tokens must be >= 1")
