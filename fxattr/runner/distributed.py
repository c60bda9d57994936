"""torch.distributed for the dataset runner: who am I, and wait for the others.

Under ``torchrun`` / ``python -m torch.distributed.run`` the launcher sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; the runner joins that
process group (gloo on CPU, NCCL on CUDA) unless one is initialized already, and leaves it
again if it created it. Every rank takes the shards ``k`` with ``k % world_size == rank``, so
the split depends only on the shard count: uneven splits are fine, no example is taken twice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Group", "join", "my_shards"]


@dataclass
class Group:
    """The ranks of one run; ``rank 0`` writes the manifest and consolidates."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created: bool = False

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def all_ok(self, ok: bool) -> bool:
        """True when every rank passes ``ok``: one rank's error stops all of them, not just itself."""
        if not self.active:
            return ok
        flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag)
        return int(flag.item()) == 0

    def leave(self) -> None:
        if self.created and dist.is_initialized():
            dist.destroy_process_group()
            self.created = False


def join(device: torch.device) -> Group:
    """The current process group, joined from torchrun's environment if needed."""
    if not dist.is_available():
        return Group()
    if dist.is_initialized():
        return Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Group()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), created=True)


def my_shards(shards: int, group: Group) -> list[int]:
    """The shards this rank computes: every ``world_size``-th, starting at its rank."""
    return list(range(group.rank, shards, group.world_size))
