"""`naee`: keep the expert subset that best reconstructs the layer output (Lu et al. 2024)."""

from ..base import register_method
from .method import NaeePruning

register_method(NaeePruning)
