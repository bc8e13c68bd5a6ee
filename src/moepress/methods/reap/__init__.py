"""`reap`: router-weighted expert activation pruning (Lasby et al. 2025)."""

from ..base import register_method
from .method import ReapPruning

register_method(ReapPruning)
