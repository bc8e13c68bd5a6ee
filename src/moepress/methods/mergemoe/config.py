from __future__ import annotations

from dataclasses import dataclass, field

from ..base import ConfigError
from ..merging_common import MergingConfig

TARGETS = ("paper", "routed", "layer")


@dataclass
class MergeMoEConfig(MergingConfig):
    """The defaults are the paper's MergeMoE; `target`, `prior` and `similarity=output` are our
    additions (method docstring and `methods/down_refit.py` say why, with measurements)."""

    similarity: str = field(default="cosine", metadata={
        "help": "how non-centre experts join the top-M-frequency centres: cosine|l2 of flattened [W_U; W_G] "
                "(paper), or output (cosine of the experts' mean outputs on the calibration tokens)"})
    tokens: str = field(default="routed", metadata={
        "help": "tokens forming X̂ of a cluster's least squares (target=paper): routed (tokens whose top-k holds "
                "a member; the inputs the merged expert will see) | all (every calibration token)"})
    solver: str = field(default="pinv", metadata={"help": "pinv (the paper's pseudo-inverse) | ridge"})
    ridge: float = field(default=1e-4, metadata={"help": "ridge λ relative to mean diag(P Pᵀ) (solver=ridge)"})
    down: str = field(default="lstsq", metadata={
        "help": "lstsq (MergeMoE Eq. 6) | average (T1 = stacked identities: M-SMoE's weighted average)"})
    target: str = field(default="paper", metadata={
        "help": "what the down projection is fitted to: paper (Σ_j B_j E_j on the cluster's tokens, Eq. 5-6) | "
                "routed (the cluster's share of the layer output, routing weights included) | "
                "layer (all merged experts jointly against the whole layer output, block Gauss-Seidel)"})
    sweeps: int = field(default=2, metadata={"help": "Gauss-Seidel sweeps over the merged experts (target=layer)"})
    prior: str = field(default="zero", metadata={
        "help": "what the ridge pulls the down projection toward (solver=ridge): zero | average "
                "(the members' frequency-weighted average down projection, M-SMoE's T1)"})

    def __post_init__(self):
        super().__post_init__()
        for name, allowed in (("similarity", ("cosine", "l2", "output")), ("tokens", ("routed", "all")),
                              ("solver", ("pinv", "ridge")), ("down", ("lstsq", "average")),
                              ("target", TARGETS), ("prior", ("zero", "average"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.ridge < 0:
            raise ConfigError(f"ridge must be >= 0, got {self.ridge}")
        if int(self.sweeps) < 1:
            raise ConfigError(f"sweeps must be >= 1, got {self.sweeps}")
        if self.prior != "zero" and self.solver != "ridge":
            raise ConfigError(f"prior={self.prior!r} needs solver='ridge' (the pseudo-inverse has no prior)")
        if self.tokens == "all" and self.target != "paper":
            raise ConfigError(f"tokens='all' applies to target='paper' only: target={self.target!r} is fitted on "
                              f"the tokens routed to each merged expert (the only ones its output reaches)")
