"""`average`: plain (uniform) parameter averaging of experts within clusters."""

from ..base import register_method
from .method import AverageMerging

register_method(AverageMerging)
