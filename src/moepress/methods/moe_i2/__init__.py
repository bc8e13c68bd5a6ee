"""`moe_i2`: MoE-I² — inter-expert pruning (non-uniform per layer) + intra-expert low-rank decomposition."""

from ..base import register_method
from .method import MoEI2

register_method(MoEI2)
