"""Evaluation for any task: the task's metrics, its loss and the forward solver's steps, f evaluations and
residuals, summed over ranks."""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from deqlab.errors import ConfigError
from deqlab.solvers.common import solver_summary
from deqlab.utils.dist import all_reduce_sum, is_main_process, to_device

__all__ = ["autocast_context", "eval_f_thres", "evaluate", "solver_summary"]


def eval_f_thres(cfg: Any) -> int:
    """The forward solver budget at evaluation: ``TEST.F_THRES``, or ``DEQ.F_THRES`` when it is 0."""
    return int(cfg.TEST.F_THRES) or int(cfg.DEQ.F_THRES)


def autocast_context(cfg: Any, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision when ``AMP.ENABLED``: ``AMP.DTYPE`` on CUDA, bfloat16 on the CPU (oneDNN runs bf16
    convolutions and matmuls on CPUs with AVX512-BF16/AMX); the DEQ keeps its solver state in fp32 regardless."""
    if not cfg.AMP.ENABLED:
        return contextlib.nullcontext()
    if device.type == "cpu" and cfg.AMP.DTYPE != "bfloat16":
        raise ConfigError(f"AMP.DTYPE {cfg.AMP.DTYPE} needs CUDA (its gradient scaler); on the CPU use bfloat16")
    return torch.autocast(device.type, dtype=getattr(torch, cfg.AMP.DTYPE))


@torch.no_grad()
def evaluate(task: Any, model: nn.Module, loader: DataLoader, device: torch.device, f_thres: int | None = None,
             desc: str = "valid", on_batch: Callable[[int, Tensor], None] | None = None) -> dict[str, Any]:
    """``task``'s metrics of ``model`` in eval mode (the DEQ solved to equilibrium) over every rank's shard,
    plus ``loss``, ``fwd_steps`` (solver steps), ``fwd_nfe`` (f evaluations), ``fwd_residual`` (means per sample)
    and ``count``. ``on_batch(i, output)`` sees every batch's output (e.g. to save predictions)."""
    model.eval()
    task.start_pass(train=False)
    meter = task.new_meter(device)
    sums = torch.zeros(5, dtype=torch.float64)  # loss·n, n, steps·n, nfe·n, residual·n
    for i, (x, y) in enumerate(tqdm(loader, desc=desc, leave=False, disable=not is_main_process(),
                                    dynamic_ncols=True)):
        x, y = to_device(x, device), y.to(device, non_blocking=True)
        with autocast_context(task.cfg, device):
            output, solve = task.predict(model, x, f_thres)
        output = output.float()
        n = len(y)
        sums += torch.tensor([task.loss(output, y).item() * n, n, solve.steps * n, solve.nfe * n, solve.residual * n],
                             dtype=torch.float64)
        meter.update(output, y)
        if on_batch is not None:
            on_batch(i, output)
    loss, count, steps, nfe, residual = all_reduce_sum(sums.to(device)).cpu().tolist()
    count = max(count, 1.0)
    return {**meter.result(), "loss": loss / count, "fwd_steps": steps / count, "fwd_nfe": nfe / count,
            "fwd_residual": residual / count, "count": int(count)}
