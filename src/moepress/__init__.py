"""moepress: compress Mixture-of-Experts LLMs and prove what it cost.

Public API (docs/design.md#python-api): `compress`, `load`, `evaluate`, `methods`; also `quantize`, `replay`.

The names are resolved on first use (PEP 562), so `import moepress.cli` stays free of torch and
`moepress --help` or an argument error answers at once.
"""

__version__ = "0.1.0"

import logging as _logging
import sys as _sys
import types as _types


def _quiet_optional_dependency_noise() -> None:
    """transformers imports torchao (the `quant` extra) on every `from_pretrained` once it is installed;
    on a CPU build torchao then warns that its CUDA kernels did not load, and torch warns about two of
    its enums. Neither matters to moepress (its int8/fp8 numerics are torchao's pure-torch primitives),
    so those two loggers are raised to ERROR unless the user has configured them."""
    for name in ("torchao", "torch.utils._pytree"):
        logger = _logging.getLogger(name)
        if logger.level == _logging.NOTSET:
            logger.setLevel(_logging.ERROR)


_quiet_optional_dependency_noise()

_API_NAMES = ("CompressionResult", "compress", "load", "quantize", "replay")


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


__all__ = ["CompressionResult", "compress", "evaluate", "load", "methods", "quantize", "replay"]
