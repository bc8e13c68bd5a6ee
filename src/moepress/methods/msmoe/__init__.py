"""`msmoe`: M-SMoE — dominant experts, router-logit grouping, neuron alignment, frequency-weighted merge."""

from ..base import register_method
from .method import MSMoE

register_method(MSMoE)
