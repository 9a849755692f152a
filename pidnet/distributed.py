"""torch.distributed set-up for ``torchrun``: one process per device, rank 0 writes files."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env(device: torch.device, join: bool = True) -> torch.device:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1): nccl on CUDA,
    gloo on CPU. Returns the device this rank should use. With ``join`` false only the
    device is chosen; ``join_group`` joins later."""
    if env_world_size() <= 1 or dist.is_initialized():
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if join:
        join_group(device)
    return device


def join_group(device: torch.device) -> None:
    if env_world_size() > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def env_world_size() -> int:
    """Processes torchrun started (1 without torchrun), whether or not they joined a group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    """This process's rank as torchrun set it (0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def rank() -> int:
    """This process's rank: in the group once joined, else as torchrun numbered it."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else env_rank()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_from_main(tensors: list[torch.Tensor]) -> None:
    """Rank 0's values of ``tensors``, in place, on every rank (a no-op in one process)."""
    if world_size() > 1:
        with torch.no_grad():
            for t in tensors:
                dist.broadcast(t, 0)
