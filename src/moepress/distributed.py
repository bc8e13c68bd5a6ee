"""Data-parallel calibration on torch.distributed (DESIGN.md §2 "pipeline").

Every calibration statistic is a sum over tokens, so ranks that each hold a shard of the
calibration sequences agree on it after an all-reduce (gloo on CPU, NCCL on GPUs). These helpers
are no-ops in a single process, so code that calls them runs unchanged without `torchrun`.
"""

from __future__ import annotations

import os

import torch


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and world_size() > 1


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def is_main_process() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    """True when the environment of `torchrun` is present (WORLD_SIZE and a rendezvous address)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ


def init_from_environment(device: torch.device | str = "cpu") -> bool:
    """Join the process group `torchrun` describes (gloo for CPU, NCCL for CUDA); False if none."""
    if not launched_by_torchrun() or not torch.distributed.is_available():
        return False
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return True


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (and return it); identity in a single process.

    The tensor must live on the process group's device (CPU for gloo, the rank's GPU for NCCL)."""
    if not is_distributed():
        return tensor
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def all_reduce_tree(value):
    """`all_reduce_sum` over every tensor in a (nested) dict/list/tuple of tensors; others unchanged."""
    if isinstance(value, torch.Tensor):
        return all_reduce_sum(value)
    if isinstance(value, dict):
        return {k: all_reduce_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(all_reduce_tree(v) for v in value)
    return value


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite `tensor` on every rank with rank `src`'s value (in place); identity in one process."""
    if is_distributed():
        torch.distributed.broadcast(tensor, src=src)
    return tensor


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def shutdown() -> None:
    """Leave the process group (a gloo rank that exits without this aborts at interpreter exit)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
