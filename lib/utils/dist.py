"""Process-group bookkeeping: rank detection (torchrun's env vars), backend choice, rank-0 helpers.

Launch with ``torchrun --nproc_per_node N tools/cls_train.py ...`` (one node or many) or the deprecated
``python -m torch.distributed.launch``; both set RANK / WORLD_SIZE / LOCAL_RANK, which is all this reads.
NCCL on CUDA, gloo on CPU.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from deqlab.utils.cpu_allocator import configure_cpu_allocator

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``: a rendezvous endpoint for local launches and tests."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` is cuda when available; under several processes each takes the GPU of its local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def init_distributed(device: str = "auto", cpu_allocator: str = "retain") -> DistInfo:
    """Join the process group torchrun describes (if any) and return this process's rank and device; apply
    the ``CPU_ALLOCATOR`` setting (``deqlab.utils.cpu_allocator``) to the process."""
    configure_cpu_allocator(cpu_allocator)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world_size, local_rank, dev)


def to_device(batch, device: torch.device):
    """A tensor, or a tuple/list of tensors (e.g. a language model's (data, target)), on ``device``."""
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    return batch.to(device, non_blocking=True)


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (a no-op for one process)."""
    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
    return values


def broadcast_from_main(obj: T) -> T:
    """Rank 0's ``obj`` (anything picklable) on every rank; ``obj`` itself for one process."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_from_all(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (anything picklable; tensors best on the CPU), in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_module(module: torch.nn.Module) -> None:
    """Overwrite ``module``'s parameters and buffers on every rank with rank 0's, in place: weights only rank 0
    could read (e.g. from a disk the other nodes do not share) reach every rank."""
    if dist.is_initialized():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
