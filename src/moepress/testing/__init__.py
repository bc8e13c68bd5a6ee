"""Random-weight models for plumbing, never quality: tiny configs of every family (`tiny`) and
checkpoints of real widths written layer by layer (`synthetic`). The test suite, the benchmarks'
`--quick` runs and `benchmarks/gpu_check.py` build on them; nothing in the library does."""

from .tiny import tiny_config, tiny_model

__all__ = ["tiny_config", "tiny_model"]
