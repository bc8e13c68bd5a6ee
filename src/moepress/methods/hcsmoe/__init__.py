"""`hcsmoe`: HC-SMoE — hierarchical clustering on expert outputs, frequency-weighted merge."""

from ..base import register_method
from .method import HCSMoE

register_method(HCSMoE)
