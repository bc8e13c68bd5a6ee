"""Options of the Compressed Experts method (docs/algorithms.md#compressed_experts)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..base import ConfigError, MethodConfig


@dataclass
class CompressedExpertsConfig(MethodConfig):
    """`ratio` here is the fraction of each token's activated experts replaced by compressed
    vectors (0.5 on a top-4 model = 2 main + 2 compressed; docs/design.md#ratio). `n_ce` (experts
    replaced) or `k_main` (experts kept) may be given instead; at most one of the three.
    Default when none is given: half, as in the paper (top-8 -> 4 + 4, top-2 -> 1 + 1).
    """

    n_ce: int | None = field(default=None, metadata={"help": "activated experts replaced by compressed vectors per token"})
    k_main: int | None = field(default=None, metadata={"help": "main experts computed in full per token (top-k - n_ce)"})
    aux_width: int | str | None = field(default="auto", metadata={
        "help": "our addition: each auxiliary expert also runs a width-R mini-expert fitted on calibration text "
                "(its R most important neurons, down + bias by least squares); auto = the expert width / 8 "
                "(best out of domain on both references); none = the paper's block (vectors only, no calibration)"})
    aux_ridge: float = field(default=0.1, metadata={
        "help": "ridge of the mini-experts' least-squares fit (relative to the Gram's mean diagonal), toward "
                "the kept neurons' own down columns; 0.1 measured best out of domain (was 1e-3)"})
    aux_fit: str = field(default="auxiliary", metadata={
        "help": "tokens the mini-experts are fitted on: auxiliary (where the expert is auxiliary) | routed "
                "(anywhere in the top-k) | all (every token, weighted by the router's score)"})
    aux_bias: bool = field(default=True, metadata={"help": "fit an output bias per mini-expert"})

    def __post_init__(self):
        super().__post_init__()
        if self.experts is not None:
            raise ConfigError(
                "compressed_experts keeps every expert stored; --experts does not apply. "
                "Use --ratio (fraction of activated experts replaced) or --opt n_ce=N / k_main=K."
            )
        given = [n for n in ("ratio", "n_ce", "k_main") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ConfigError(f"give only one of ratio, n_ce, k_main (got {', '.join(given)})")
        if self.n_ce is not None and int(self.n_ce) < 0:
            raise ConfigError(f"n_ce must be >= 0, got {self.n_ce}")
        if self.k_main is not None and int(self.k_main) < 1:
            raise ConfigError(f"k_main must be >= 1, got {self.k_main}")
        if isinstance(self.aux_width, str) and self.aux_width != "auto":
            raise ConfigError(f"aux_width must be auto, none or a width >= 0, got {self.aux_width!r}")
        if isinstance(self.aux_width, int) and self.aux_width < 0:
            raise ConfigError(f"aux_width must be >= 0 (0 = an output vector per expert), got {self.aux_width}")
        if self.aux_fit not in ("auxiliary", "routed", "all"):
            raise ConfigError(f"aux_fit must be one of auxiliary, routed, all; got {self.aux_fit!r}")
        if self.aux_ridge < 0:
            raise ConfigError(f"aux_ridge must be >= 0, got {self.aux_ridge}")

    def resolve_aux_width(self, intermediate_size: int) -> int | None:
        """The mini-experts' width for experts of `intermediate_size` neurons (None = the paper's block).

        `auto` = I/8: measured best out of domain at 1/8 of the width on both references
        (`benchmarks/ce_out_of_domain.py`: R=32 of 256 on mixtral-ref, R=24 of 192 on qwen3-ref; a
        top-4 -> 2 + 2 layer then activates 2.25 experts' worth of routed parameters against stock
        top-3's 3)."""
        if self.aux_width is None:
            return None
        if self.aux_width == "auto":
            return max(1, round(intermediate_size / 8))
        return int(self.aux_width)

    def resolve_k_main(self, top_k: int) -> int:
        """Main experts per token for a model routing to `top_k` experts (a clear error if impossible)."""
        if self.k_main is not None:
            k_main = int(self.k_main)
        elif self.n_ce is not None:
            k_main = top_k - int(self.n_ce)
        else:
            ratio = 0.5 if self.ratio is None else float(self.ratio)
            k_main = top_k - int(top_k * ratio + 0.5)
        if not 1 <= k_main <= top_k:
            raise ConfigError(
                f"this model routes each token to top-k={top_k} experts; between 0 and {top_k - 1} of them "
                f"can be replaced by compressed vectors (k_main between 1 and {top_k}), got k_main={k_main}"
            )
        return k_main
