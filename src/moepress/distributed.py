"""Data-parallel calibration on torch.distributed (docs/design.md#pipeline).

Every calibration statistic is a sum over tokens, so ranks that each hold a shard of the
calibration sequences agree on it after an all-reduce (gloo on CPU, NCCL on GPUs). These helpers
are no-ops in a single process, so code that calls them runs unchanged without `torchrun`.

Sharding is contiguous (`shard_slice`): rank r takes sequences `[r·n/N, (r+1)·n/N)`, so the
ranks' shards concatenated in rank order are exactly the single-process calibration set, in
the same order (NAEE's "first max_tokens tokens" is then the same token set on 1 or N ranks).
Tensors may live on any device: a collective stages them through the process group's device
(CPU for gloo, the rank's GPU for NCCL) when they are elsewhere.
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


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK; 0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_environment(device: torch.device | str = "cpu") -> bool:
    """Join the process group `torchrun` describes (gloo for CPU, NCCL for CUDA); False if none.

    With a CUDA device the rank's current GPU is set first (NCCL collectives run on it)."""
    if not launched_by_torchrun() or not torch.distributed.is_available():
        return False
    if not torch.distributed.is_initialized():
        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device if device.index is not None else local_rank())
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return True


def _group_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _collective(tensor: torch.Tensor, op) -> torch.Tensor:
    """Run `op(t)` in place on `tensor`, staged through the group's device if needed."""
    target = _group_device()
    if tensor.device == target and tensor.is_contiguous():
        op(tensor)
        return tensor
    staged = tensor.detach().to(target).contiguous()
    op(staged)
    with torch.no_grad():
        tensor.copy_(staged)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (and return it); identity in a single process."""
    if not is_distributed():
        return tensor
    return _collective(tensor, lambda t: torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM))


def all_reduce_number(value: float | int) -> float | int:
    """Sum of a Python number over ranks (float64 on the wire; ints stay ints)."""
    if not is_distributed():
        return value
    total = all_reduce_sum(torch.tensor([float(value)], dtype=torch.float64)).item()
    return int(round(total)) if isinstance(value, int) and not isinstance(value, bool) else total


def shard_slice(n: int) -> slice:
    """This rank's contiguous share of `n` items: `[r·n//N, (r+1)·n//N)`; all of them in one process.

    The shards in rank order are exactly `range(n)`, so sums over them equal the single-process sums."""
    w, r = world_size(), rank()
    return slice(r * n // w, (r + 1) * n // w)


def counts_by_rank(count: int) -> list[int]:
    """`[count of rank 0, count of rank 1, ...]` (one all-reduce); `[count]` in one process."""
    if not is_distributed():
        return [count]
    table = torch.zeros(world_size(), dtype=torch.float64)
    table[rank()] = count
    return [int(c) for c in all_reduce_sum(table).tolist()]


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
        _collective(tensor, lambda t: torch.distributed.broadcast(t, src=src))
    return tensor


def broadcast_module_(module: torch.nn.Module, src: int = 0) -> torch.nn.Module:
    """Every parameter and buffer of `module` overwritten with rank `src`'s values (same structure
    on every rank is required: ranks built it from identical reduced statistics)."""
    if is_distributed():
        for tensor in module.state_dict(keep_vars=True).values():
            broadcast_(tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor, src)
    return module


def broadcast_object(value, src: int = 0):
    """Rank `src`'s picklable `value` on every rank (e.g. a temporary directory's path)."""
    if not is_distributed():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def shutdown() -> None:
    """Leave the process group (a gloo rank that exits without this aborts at interpreter exit)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
