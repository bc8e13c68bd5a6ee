"""Inference modules for non-stock results and their auto_map export.

The files here import only torch and transformers, because they ship inside checkpoints.
"""

from pathlib import Path

MODELING_DIR = Path(__file__).parent
MODELING_FILES = (
    "modeling_moepress.py", "moepress_common.py", "moepress_remap.py", "moepress_delta.py",
    "moepress_compressed.py", "moepress_lowrank.py",
)
