"""`zipit`: ZipIt!-style neuron zipping of experts within clusters."""

from ..base import register_method
from .method import ZipItMerging

register_method(ZipItMerging)
