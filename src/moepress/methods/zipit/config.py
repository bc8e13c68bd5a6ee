from __future__ import annotations

from dataclasses import dataclass

from ..merging_common import MergingConfig


@dataclass
class ZipItConfig(MergingConfig):
    """No own options: grouping as M-SMoE (router logits), weights by usage frequency."""
