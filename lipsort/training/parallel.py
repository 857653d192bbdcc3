"""Data parallelism for :func:`lipsort.training.fit` under ``torchrun``: joining the process
group, splitting global batches into per-process shards, summing statistics over processes.

Outside ``torchrun`` (no process group, ``WORLD_SIZE`` unset) everything here is the identity:
rank 0 of a world of one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["all_reduce", "init_distributed", "shard", "world"]


def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """Join the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ...); ``(rank,
    world_size)``.

    Does nothing if the group exists already, and returns ``(0, 1)`` outside ``torchrun``.
    The backend defaults to nccl with GPUs (each process then uses ``cuda:LOCAL_RANK``), gloo
    without.

    Example:
        >>> init_distributed()  # a plain process, not started by torchrun
        (0, 1)
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` without a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(batch: Sequence[Tensor], rank: int, world_size: int) -> tuple[Tensor, ...]:
    """This process's contiguous part of every tensor of a global batch (first dimension).

    Shard sizes differ by at most one, larger ones first (``torch.tensor_split``).

    Example:
        >>> [tuple(shard((torch.arange(5),), r, 2)[0].tolist()) for r in (0, 1)]
        [(0, 1, 2), (3, 4)]
    """
    return tuple(t.tensor_split(world_size)[rank] for t in batch)


def all_reduce(values: Tensor) -> Tensor:
    """The sum of ``values`` over all processes (``values`` itself in a world of one)."""
    import torch.distributed as dist

    if world()[1] > 1:
        device = values.device
        if dist.get_backend() == "nccl":
            values = values.cuda()
        dist.all_reduce(values)
        values = values.to(device)
    return values
