"""Options of D²-MoE (docs/algorithms.md#d2moe). Recorded as-is in moepress.json."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..base import ConfigError, MethodConfig

BASES = ("fisher", "mean", "freq")
RATIO_MODES = ("experts", "whole_model")
DYNAMIC_SCOPES = ("token", "batch")
FISHER_PRECISIONS = ("float64", "float32")


@dataclass
class D2MoEConfig(MethodConfig):
    """D²-MoE: Fisher-weighted shared base + whitened low-rank deltas + semi-dynamic base pruning."""

    base: str = field(default="fisher", metadata={"help": "how the shared base is merged: fisher | mean | freq"})
    ratio_mode: str = field(default="experts", metadata={
        "help": "experts: --ratio = fraction of routed-expert parameters removed (moepress); "
                "whole_model: fraction of all parameters removed (the paper's Table 12)"})
    base_prune: float = field(default=0.1, metadata={
        "help": "fraction of the base's intermediate channels pruned (paper pp_ratio; 0.1 'performance', "
                "0.6 'throughput'); static_share of it is removed at compression time, the rest at run time "
                "(per token or per batch: dynamic_scope)"})
    static_share: float = field(default=0.5, metadata={"help": "share of base_prune done statically (paper: 0.5)"})
    dynamic_scope: str = field(default="token", metadata={
        "help": "dynamic base pruning per token (default: a token's output never depends on its batch, as "
                "serving needs) or per batch (the paper's Eq. 9 on the batch: outputs change with batch composition)"})
    share_v: bool = field(default=False, metadata={"help": "one V per projection shared by all experts (paper Table 11)"})
    rank: int | None = field(default=None, metadata={"help": "explicit rank for every delta (replaces --ratio)"})
    rank_multiple: int = field(default=8, metadata={
        "help": "round a ratio-derived rank down to this multiple when the rank is at least 32 times it "
                "(costs < 3% of the delta budget; 16-byte aligned rows for grouped kernels); 1 = exact"})
    channel_multiple: int = field(default=64, metadata={"help": "round pruned channel counts to this multiple where the width allows"})
    fisher_batch_size: int = field(default=1, metadata={"help": "sequences per forward/backward when estimating Fisher"})
    fisher_chunk_layers: int = field(default=4, metadata={"help": "MoE layers whose expert gradients are held at once"})
    fisher_precision: str = field(default="float64", metadata={
        "help": "accumulators of the squared gradients: float64 (default: the sum is the same on any number of "
                "data-parallel ranks) or float32 (half the memory, as the released code; ranks then agree only "
                "to float32 summation order)"})
    fisher_samples: int | None = field(default=None, metadata={"help": "calibration sequences used for Fisher (default: all)"})

    def __post_init__(self):
        super().__post_init__()
        if self.base not in BASES:
            raise ConfigError(f"base must be one of {', '.join(BASES)}, got {self.base!r}")
        if self.ratio_mode not in RATIO_MODES:
            raise ConfigError(f"ratio_mode must be one of {', '.join(RATIO_MODES)}, got {self.ratio_mode!r}")
        if self.dynamic_scope not in DYNAMIC_SCOPES:
            raise ConfigError(f"dynamic_scope must be one of {', '.join(DYNAMIC_SCOPES)}, got {self.dynamic_scope!r}")
        if self.fisher_precision not in FISHER_PRECISIONS:
            raise ConfigError(f"fisher_precision must be one of {', '.join(FISHER_PRECISIONS)}, "
                              f"got {self.fisher_precision!r}")
        if not 0.0 <= float(self.base_prune) < 1.0:
            raise ConfigError(f"base_prune must be in [0, 1), got {self.base_prune}")
        if not 0.0 <= float(self.static_share) <= 1.0:
            raise ConfigError(f"static_share must be in [0, 1], got {self.static_share}")
        if self.rank is not None and int(self.rank) < 0:
            raise ConfigError(f"rank must be >= 0, got {self.rank}")
        if self.rank is None and self.ratio is None:
            raise ConfigError("D²-MoE needs --ratio (fraction of routed-expert parameters removed) or --opt rank=R")
        if self.experts is not None:
            raise ConfigError("D²-MoE keeps every expert; give --ratio, not --experts")
        for name in ("rank_multiple", "channel_multiple", "fisher_batch_size", "fisher_chunk_layers"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.fisher_samples is not None and int(self.fisher_samples) < 1:
            raise ConfigError(f"fisher_samples must be >= 1, got {self.fisher_samples}")
