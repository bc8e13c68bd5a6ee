"""`hcsmoe`: HC-SMoE — clustering of expert outputs (as its authors run it), frequency-weighted merge."""

from ..base import register_method
from .method import HCSMoE

register_method(HCSMoE)
