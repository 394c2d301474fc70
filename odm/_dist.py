"""``torch.distributed`` helpers shared by the loader, the mixer and the callbacks: one bottom layer.

Every function takes an optional ``group`` (a ``ProcessGroup``); ``None`` means the default (world) group.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["all_reduce_host", "comm_device", "distributed", "rank_world"]


_AVAILABLE = torch.distributed.is_available()  # fixed by the build


def _initialized() -> bool:
    return _AVAILABLE and torch.distributed.is_initialized()


def distributed(group: Any = None) -> bool:
    """Whether a ``torch.distributed`` group of more than one rank is running."""
    return _initialized() and torch.distributed.get_world_size(group) > 1


def rank_world(group: Any = None) -> tuple[int, int]:
    """``(rank, world size)`` in ``group``; ``(0, 1)`` when ``torch.distributed`` is not initialised."""
    if not _initialized():
        return 0, 1
    return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)


def comm_device(group: Any = None) -> torch.device:
    """Where a host-side collective runs: NCCL needs a CUDA tensor, gloo a CPU one."""
    if torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_host(acc: np.ndarray, group: Any = None) -> np.ndarray:
    """Sums a host vector over the ranks of ``group`` (one collective) and returns it on the host."""
    flat = torch.from_numpy(np.ascontiguousarray(acc)).to(comm_device(group))
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM, group=group)
    return flat.cpu().numpy()
