"""torchrun / DDP plumbing: process group from the environment (timm's helper), reductions, rank-0 writes."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from timm.utils import init_distributed_device

__all__ = ["DistEnv", "all_gather_object", "all_reduce_sum", "broadcast_object", "setup_distributed"]


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job; single-process runs have ``world_size == 1``."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files, TensorBoard and checkpoints."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (no-op when single-process)."""
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """Tear the process group down (no-op when single-process)."""
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def setup_distributed(device: str | None) -> DistEnv:
    """Join the torchrun job described by the environment (gloo on CPU, nccl on CUDA), or run alone.

    ``device`` defaults to ``cuda`` when available, else ``cpu``; under torchrun each rank takes
    ``cuda:<LOCAL_RANK>``.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    backend = "nccl" if device.startswith("cuda") else "gloo"
    info = SimpleNamespace(device=device, dist_backend=backend, dist_url="env://")
    init_distributed_device(info)  # timm's: reads torchrun's environment, sets rank, world size and device
    return DistEnv(torch.device(info.device), info.rank, info.world_size, info.distributed)


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place and return it."""
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out
