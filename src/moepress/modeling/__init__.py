"""Inference modules for non-stock results and their auto_map export.

The files here import only torch and transformers, because they ship inside checkpoints.
"""

from pathlib import Path

MODELING_DIR = Path(__file__).parent
# Every module here ships (they import one another by relative imports); the package marker does not.
MODELING_FILES = tuple(sorted(p.name for p in MODELING_DIR.glob("*.py") if p.name != "__init__.py"))
