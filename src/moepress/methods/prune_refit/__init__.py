"""`prune_refit`: prune experts, then let the kept experts absorb the pruned ones' output by least squares."""

from ..base import register_method
from .method import PruneRefit

register_method(PruneRefit)
