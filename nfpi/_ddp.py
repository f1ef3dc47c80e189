"""Process layout of a training run under ``torchrun`` (docs/method.md §4.9: DistributedDataParallel, NCCL on
GPU, gloo on CPU; ``batch_size`` is the global batch and only rank 0 writes files).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._util import pick_device

__all__ = ["Layout", "setup_distributed"]


@dataclass
class Layout:
    """Process layout: ``rank``/``world`` (1 without torch.distributed), the device, and
    whether a process group is in use (``active``: DDP and collectives, even for one process)."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool
    active: bool = False


def setup_distributed(pref: str) -> Layout:
    """Join the process group of ``torchrun`` (or one initialised by the caller). Under
    torchrun a group is opened even for one process, so a one-GPU run exercises NCCL and DDP."""
    device = pick_device(pref)
    owns = False
    torchrun = all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    if not (dist.is_available() and dist.is_initialized()) and torchrun:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    if not (dist.is_available() and dist.is_initialized()):
        return Layout(0, 1, device, False)
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        torch.cuda.set_device(device)
    return Layout(rank, world, device, owns, active=True)
