"""`frequency`: keep the experts most often in the calibration tokens' top-k."""

from ..base import register_method
from .method import FrequencyPruning

register_method(FrequencyPruning)
