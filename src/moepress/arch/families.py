"""The table of supported families, built from the single table in `moepress/modeling/moepress_family.py`.

Adding a family = one row there + one row in the tiny-config test table (`moepress/testing/tiny.py`).
"""

from __future__ import annotations

from ..modeling.moepress_family import FAMILY_FACTS
from .spec import FamilySpec

FAMILIES: dict[str, FamilySpec] = {name: FamilySpec.of(row) for name, row in FAMILY_FACTS.items()}

SUPPORTED = tuple(FAMILIES)
