from __future__ import annotations

from dataclasses import dataclass, field

from ..base import ConfigError
from ..merging_common import MergingConfig

LINKAGES = ("average", "single", "complete", "ward")


@dataclass
class HCSMoEConfig(MergingConfig):
    linkage: str = field(default="average", metadata={"help": "agglomerative linkage: average|single|complete|ward"})
    merge: str = field(default="frequency", metadata={"help": "within-cluster weights: frequency|uniform"})

    def __post_init__(self):
        super().__post_init__()
        if self.linkage not in LINKAGES:
            raise ConfigError(f"linkage must be one of {LINKAGES}, got {self.linkage!r}")
        if self.merge not in ("frequency", "uniform"):
            raise ConfigError(f"merge must be 'frequency' or 'uniform', got {self.merge!r}")
