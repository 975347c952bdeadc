"""``gpu_check.py``'s distributed checks: process groups (NCCL on CUDA, gloo everywhere) and a SyncBatchNorm
segmentation step."""
from __future__ import annotations

import os
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gpu_check_common import compared, flat_grads, rel_diff, row
from gpu_check_steps import SAME_TOL, build, fp32_grads
from deqlab.utils.dist import free_port


def _rank(rank: int, world: int, device: str, port: int) -> None:
    """One process of the group, joined the way the training tools join it (torchrun's variables read by
    ``deqlab.utils.dist.init_distributed``): rank r contributes r + 1 to an all_reduce."""
    from deqlab.utils.dist import all_reduce_sum, cleanup, init_distributed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    info = init_distributed(device, "system")
    try:
        total = all_reduce_sum(torch.tensor([rank + 1.0], device=info.device)).item()
        expected = world * (world + 1) / 2
        backend = dist.get_backend()
        if total != expected or backend != ("nccl" if device == "cuda" else "gloo"):
            raise AssertionError(f"{backend} all_reduce gave {total}, expected {expected}")
    finally:
        cleanup()


def one_process_group(backend: str, device: torch.device) -> None:
    """Join a group of one (training never makes one: ``init_distributed`` skips a world of 1) for
    ``backend`` in this process, all_reduce through it and leave it."""
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        value = torch.tensor([2.5], device=device)
        dist.all_reduce(value)
        if value.item() != 2.5:
            raise AssertionError(f"{backend} all_reduce of one rank gave {value.item()}, expected 2.5")
    finally:
        dist.destroy_process_group()


def group_checks(device: torch.device) -> list[dict]:
    """gloo with one and two processes on the CPU; NCCL with one process per visible GPU (one, then two)."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    rows = []
    for backend, dev in (("gloo", "cpu"), ("nccl", "cuda")):
        for world in (1, 2):
            name = f"dist/{backend}/{world}"
            if backend == "nccl" and gpus < world:
                rows.append(row(name, device.type, "n/a", reason=f"needs {world} visible GPU(s), {gpus} visible"))
                continue
            try:
                if world == 1:
                    one_process_group(backend, torch.device(dev, 0) if dev == "cuda" else torch.device(dev))
                else:
                    mp.spawn(_rank, args=(world, dev, free_port()), nprocs=world)
                rows.append(row(name, dev, "pass", world * (world + 1) / 2 if world > 1 else 2.5, "exact",
                                f"all_reduce over {world} process(es)"))
            except Exception as err:  # the failure is the result
                rows.append(row(name, dev, "fail", reason=f"{type(err).__name__}: {str(err).strip()[-300:]}"))
    return rows


def syncbn_check(device: torch.device) -> dict:
    """A seg train step with SyncBatchNorm under DDP (as the Trainer converts it, NCCL group of one process)
    equals the plain BatchNorm step: one rank's statistics are the batch's."""
    name = "syncbn/seg"
    if device.type != "cuda":
        return row(name, device.type, "n/a", reason="SyncBatchNorm has no CPU implementation (CUDA only)")
    try:
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        plain = build("seg", device)
        synced = build("seg", device)
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(synced.model)
        if not any(isinstance(m, torch.nn.SyncBatchNorm) for m in net.modules()):
            raise AssertionError("the seg model has no BatchNorm to convert")
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index or 0])
        out0, g0 = fp32_grads(plain, plain.model)
        ddp.zero_grad(set_to_none=True)
        out1 = synced.output(ddp, None)
        synced.loss(out1).backward()
        g1 = flat_grads(net)
        err = max(rel_diff(out1, out0), rel_diff(g1, g0))
        return compared(name, device.type, err, SAME_TOL, "max relative difference of output and gradient")
    except Exception:  # the failure is the result
        return row(name, device.type, "fail", reason=traceback.format_exc(limit=2)[-300:])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
