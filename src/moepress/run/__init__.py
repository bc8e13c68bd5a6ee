"""The run: a compression job and what carries it out (docs/architecture.md#the-run).

`job.py`: `CompressJob`, every option of a run checked once and frozen.
"""

from .job import CalibrationSpec, CompressJob, LayerSelection

__all__ = ["CalibrationSpec", "CompressJob", "LayerSelection"]
