"""Evaluation for any task: the task's metrics, its loss and the forward solver's steps, f evaluations and
residuals, summed over ranks."""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from deqlab.solvers.common import solver_summary
from deqlab.utils.dist import all_reduce_sum, is_main_process, to_device

__all__ = ["autocast_context", "eval_f_thres", "evaluate", "grad_scaler", "solver_summary"]
log = logging.getLogger("deqlab")


def eval_f_thres(cfg: Any) -> int:
    """The forward solver budget at evaluation: ``TEST.F_THRES``, or ``DEQ.F_THRES`` when it is 0."""
    return int(cfg.TEST.F_THRES) or int(cfg.DEQ.F_THRES)


def autocast_context(cfg: Any, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision in ``AMP.DTYPE`` when ``AMP.ENABLED``, on CUDA and on the CPU (oneDNN runs bf16
    convolutions and matmuls fast on CPUs with AVX512-BF16/AMX; float16 runs there too, but slowly without
    AVX512-FP16/AMX-FP16); the DEQ keeps its solver state in fp32 regardless."""
    if not cfg.AMP.ENABLED:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, cfg.AMP.DTYPE))


def grad_scaler(cfg: Any, device: torch.device) -> torch.amp.GradScaler:
    """The loss scaler of float16 AMP (disabled otherwise: bfloat16 has float32's range). torch has one for the
    CPU as well as for CUDA, so float16 is not CUDA-only."""
    return torch.amp.GradScaler(device.type, enabled=bool(cfg.AMP.ENABLED) and cfg.AMP.DTYPE == "float16")


@torch.no_grad()
def evaluate(task: Any, model: nn.Module, loader: DataLoader, device: torch.device, f_thres: int | None = None,
             desc: str = "valid", on_batch: Callable[[int, Tensor], None] | None = None,
             train_step: int = -1) -> dict[str, Any]:
    """``task``'s metrics of ``model`` in eval mode over every rank's shard, plus ``loss``, ``fwd_steps`` (solver
    steps), ``fwd_nfe`` (f evaluations), ``fwd_residual`` (means per sample), ``count`` and, when the model
    estimates it (``DEQ.SPECTRAL_RADIUS_MODE``), ``sradius`` (mean per sample; also logged). ``on_batch(i,
    output)`` sees every batch's output (e.g. to save predictions). ``train_step``: the training step evaluated
    at (``Task.predict``; -1: after training)."""
    model.eval()
    task.start_pass(train=False)
    meter = task.new_meter(device)
    sums = torch.zeros(7, dtype=torch.float64)  # loss·n, n, steps·n, nfe·n, residual·n, sradius·n, n with a sradius
    for i, (x, y) in enumerate(tqdm(loader, desc=desc, leave=False, disable=not is_main_process(),
                                    dynamic_ncols=True)):
        x, y = to_device(x, device), y.to(device, non_blocking=True)
        with autocast_context(task.cfg, device):
            output, solve, sradius = task.predict(model, x, f_thres, train_step)
        output = output.float()
        n = len(y)
        sums += torch.tensor([task.loss(output, y).item() * n, n, solve.steps * n, solve.nfe * n, solve.residual * n,
                              (sradius or 0.0) * n, n if sradius is not None else 0], dtype=torch.float64)
        meter.update(output, y)
        if on_batch is not None:
            on_batch(i, output)
    loss, count, steps, nfe, residual, sradius, with_sradius = all_reduce_sum(sums.to(device)).cpu().tolist()
    count = max(count, 1.0)
    metrics = {**meter.result(), "loss": loss / count, "fwd_steps": steps / count, "fwd_nfe": nfe / count,
               "fwd_residual": residual / count, "count": int(count)}
    if with_sradius:
        metrics["sradius"] = sradius / with_sradius
        if is_main_process():  # as both originals log it
            log.info("%s: spectral radius of df/dz at z* (power iteration, mean of the evaluation): %.4f", desc,
                     metrics["sradius"])
    return metrics
