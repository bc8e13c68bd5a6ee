"""moepress: compress Mixture-of-Experts LLMs and prove what it cost.

Public API (DESIGN.md §1): `compress`, `load`, `evaluate`, `methods`.

The names are resolved on first use (PEP 562), so `import moepress.cli` stays free of torch and
`moepress --help` or an argument error answers at once.
"""

__version__ = "0.1.0"

import sys as _sys
import types as _types

_API_NAMES = ("CompressionResult", "compress", "load", "quantize")


def evaluate(model, **kwargs):
    """Evaluate a model or checkpoint path (perplexity, tasks, parameters, speed); see moepress.eval."""
    from .eval import evaluate as _evaluate

    return _evaluate(model, **kwargs)


def _methods():
    """`{name: one-line summary}` of every registered method."""
    from .api import methods as _registered

    return _registered()


class _Package(_types.ModuleType):
    """`moepress.methods` is the API function, as it was when the API was imported eagerly: importing
    the subpackage `moepress.methods` later must not replace it (the import system sets the
    attribute; this setter ignores that, the subpackage stays in sys.modules)."""

    @property
    def methods(self):
        return _methods

    @methods.setter
    def methods(self, value):
        pass


_sys.modules[__name__].__class__ = _Package


def __getattr__(name):
    if name in _API_NAMES:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'moepress' has no attribute {name!r}")


__all__ = ["CompressionResult", "compress", "evaluate", "load", "methods", "quantize"]
