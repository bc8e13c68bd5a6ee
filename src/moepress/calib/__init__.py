"""Calibration: text sources, packing into token sequences, per-layer statistics."""

from .packing import CalibrationSet, build_calibration, pack_token_ids
from .sources import CalibrationError, load_texts
from .stats import LayerStatistics, statistic

__all__ = ["CalibrationError", "CalibrationSet", "LayerStatistics", "build_calibration", "load_texts",
           "pack_token_ids", "statistic"]
