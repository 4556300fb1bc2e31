"""The data-parallel context of a run: the process group that ``torchrun`` describes (one
process without it), and the agreement across ranks that skip and stop decisions need."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class _Dist:
    """Data-parallel context: ``world == 1`` without ``torchrun``."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1


def _init_distributed(device_name: str) -> _Dist:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Backend: NCCL on CUDA, gloo on CPU (multi-node works the same way: ``torchrun``
    sets MASTER_ADDR/PORT, RANK and WORLD_SIZE).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local)
    return _Dist(rank, world, local)


def _any(flag: bool, ctx: _Dist, device: torch.device) -> bool:
    """True if ``flag`` is true on any rank (skip decisions must agree across ranks)."""
    if not ctx.active:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
