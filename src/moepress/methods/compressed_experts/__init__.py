"""Compressed Experts (He, Liu, Liang, Awadalla 2025; docs/algorithms.md#compressed_experts)."""

from ..base import register_method
from .config import CompressedExpertsConfig
from .method import CompressedExperts

__all__ = ["CompressedExperts", "CompressedExpertsConfig"]

register_method(CompressedExperts)
