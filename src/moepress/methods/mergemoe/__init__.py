"""`mergemoe`: MergeMoE — expert output merging with a least-squares down projection."""

from ..base import register_method
from .method import MergeMoE

register_method(MergeMoE)
