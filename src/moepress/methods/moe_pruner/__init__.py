"""`moe_pruner`: MoE-Pruner — router-weighted unstructured (or N:M) pruning of expert weights."""

from ..base import register_method
from .method import MoEPruner

register_method(MoEPruner)
