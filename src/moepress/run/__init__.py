"""The run: a compression job and what carries it out (docs/architecture.md#the-run).

- `job.py`: `CompressJob`, every option of a run checked once and frozen.
- `walk.py`: the one walk over the decoder layers (onload -> visit -> offload) and its primitives.
- `store.py`: where the layers live during a run (in memory, or streamed from the source with
  finished layers on disk, resumable).
- `plan.py`: which layers are compressed and how many experts each keeps (`--layers`, `--budget`).
- `pipeline.py`: the compression loop (`compress_layers`), a walk whose visitor is the method.
- `cache.py` / `cache_keys.py`: the statistics cache's storage and its keys.
"""

from .job import CalibrationSpec, CompressJob, LayerSelection

__all__ = ["CalibrationSpec", "CompressJob", "LayerSelection"]
