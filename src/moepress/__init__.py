"""moepress: compress Mixture-of-Experts LLMs and prove what it cost.

Public API (DESIGN.md §1): `compress`, `load`, `evaluate`, `methods`.
"""

from .api import CompressionResult, compress, load, methods

__version__ = "0.1.0"


def evaluate(model, **kwargs):
    """Evaluate a model or checkpoint path (perplexity, tasks, parameters, speed); see moepress.eval."""
    from .eval import evaluate as _evaluate

    return _evaluate(model, **kwargs)


__all__ = ["CompressionResult", "compress", "evaluate", "load", "methods"]
