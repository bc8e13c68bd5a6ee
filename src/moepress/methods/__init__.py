"""Compression methods: one package each, registered with `register_method` (see base.py)."""

from .base import (
    ConfigError,
    Finalized,
    LayerContext,
    LayerResult,
    Method,
    MethodConfig,
    Requirements,
    available_methods,
    build_method,
    coerce_option,
    describe_options,
    get_method,
    register_method,
)

__all__ = [
    "ConfigError", "Finalized", "LayerContext", "LayerResult", "Method", "MethodConfig", "Requirements",
    "available_methods", "build_method", "coerce_option", "describe_options", "get_method", "register_method",
]
