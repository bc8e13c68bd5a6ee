"""D²-MoE: delta decompression of MoE experts (Gu et al., ICML 2025). See method.py."""

from ..base import register_method
from .config import D2MoEConfig
from .method import D2MoE

__all__ = ["D2MoE", "D2MoEConfig"]

register_method(D2MoE)
