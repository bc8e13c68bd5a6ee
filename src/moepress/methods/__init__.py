"""Compression methods: one package each, registered with `register_method` (see base.py)."""

from .base import (
    ConfigError,
    LayerContext,
    LayerResult,
    Method,
    MethodConfig,
    available_methods,
    build_method,
    coerce_option,
    describe_options,
    get_method,
    register_method,
)

__all__ = [
    "ConfigError", "LayerContext", "LayerResult", "Method", "MethodConfig",
    "available_methods", "build_method", "coerce_option", "describe_options", "get_method", "register_method",
]
