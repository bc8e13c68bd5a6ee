from __future__ import annotations

from dataclasses import dataclass, field

from ...checks import PROPAGATIONS
from ..base import ConfigError
from ..merging_common import MergingConfig

LINKAGES = ("average", "single", "complete", "ward")
METRICS = ("euclidean", "cosine")
CLUSTERINGS = ("hierarchical", "kmeans")


@dataclass
class HCSMoEConfig(MergingConfig):
    cluster: str = field(default="kmeans", metadata={
        "help": "kmeans (default): the standardised K-means the authors' code runs by default and their "
                "released scripts execute (their --cluster value is misspelt); hierarchical: agglomerative "
                "clustering as the paper describes it (uses linkage and metric)"})
    linkage: str = field(default="average", metadata={
        "help": "agglomerative linkage (cluster=hierarchical): average (the authors' scripts) | single | "
                "complete | ward"})
    metric: str = field(default="euclidean", metadata={
        "help": "distance between expert-output features (cluster=hierarchical): euclidean (the authors' "
                "code) | cosine"})
    merge: str = field(default="frequency", metadata={"help": "within-cluster weights: frequency|uniform"})
    propagation: str = field(default="original", metadata={
        "help": "states the statistics of each layer come from: original (the unmerged model's, as the "
                "authors' code gathers them in one forward pass) | compressed (through the merged layers)"})
    kmeans_seed: int = field(default=0, metadata={
        "help": "seed of the k-means++ draws (cluster=kmeans); MoE layer i uses kmeans_seed + i. The result "
                "depends on it (one draw per layer, as in the authors' code)"})

    def __post_init__(self):
        super().__post_init__()
        if self.cluster not in CLUSTERINGS:
            raise ConfigError(f"cluster must be one of {CLUSTERINGS}, got {self.cluster!r}")
        if self.linkage not in LINKAGES:
            raise ConfigError(f"linkage must be one of {LINKAGES}, got {self.linkage!r}")
        if self.metric not in METRICS:
            raise ConfigError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.linkage == "ward" and self.metric != "euclidean":
            raise ConfigError("linkage='ward' needs metric='euclidean' (Ward's criterion is a Euclidean variance)")
        if self.cluster == "kmeans" and self.metric != "euclidean":
            raise ConfigError(f"metric={self.metric!r} applies to cluster='hierarchical'; the default K-means is "
                              f"Euclidean (as in the authors' code): add cluster='hierarchical' or drop metric")
        if self.cluster == "kmeans" and self.linkage != "average":
            raise ConfigError(f"linkage={self.linkage!r} applies to cluster='hierarchical' (the default is K-means, "
                              f"which has no linkage): add cluster='hierarchical' or drop linkage")
        if self.propagation not in PROPAGATIONS:
            raise ConfigError(f"propagation must be one of {PROPAGATIONS}, got {self.propagation!r}")
        if self.merge not in ("frequency", "uniform"):
            raise ConfigError(f"merge must be 'frequency' or 'uniform', got {self.merge!r}")
