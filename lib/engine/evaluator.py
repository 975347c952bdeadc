"""Evaluation: top-1/top-5 accuracy, loss and the forward solver's steps and residuals, summed over ranks."""
from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from deqlab.utils.dist import all_reduce_sum, is_main_process


def autocast_context(cfg: Any, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA when ``AMP.ENABLED``; the DEQ keeps its solver state in fp32 regardless."""
    if cfg.AMP.ENABLED and device.type == "cuda":
        return torch.autocast("cuda", dtype=getattr(torch, cfg.AMP.DTYPE))
    return contextlib.nullcontext()


def solver_summary(stats: dict | None) -> tuple[float, float]:
    """(f evaluations, mean final relative residual) of one solve; (0, 0) when there was none."""
    if not stats:
        return 0.0, 0.0
    return float(stats["nstep"]), float(stats["rel_lowest"].float().mean())


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, cfg: Any, device: torch.device,
             f_thres: int | None = None, desc: str = "valid") -> dict[str, float]:
    """Metrics of ``model`` in eval mode (the DEQ solved to equilibrium) over every rank's shard."""
    model.eval()
    sums = torch.zeros(6, dtype=torch.float64)  # loss, top1, top5, count, steps·n, residual·n
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not is_main_process(), dynamic_ncols=True):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast_context(cfg, device):
            logits, info = model(x, train_step=-1, f_thres=f_thres)
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        steps, residual = solver_summary(info["fwd"])
        n = len(y)
        sums += torch.tensor([F.cross_entropy(logits, y, reduction="sum").item(),
                              (top5[:, 0] == y).sum().item(), (top5 == y[:, None]).any(dim=1).sum().item(),
                              n, steps * n, residual * n], dtype=torch.float64)
    loss, top1, top5, count, steps, residual = all_reduce_sum(sums.to(device)).cpu().tolist()
    count = max(count, 1.0)
    return {"loss": loss / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count,
            "fwd_steps": steps / count, "fwd_residual": residual / count, "count": int(count)}
