"""Optimizer and learning-rate schedule from the config; the schedule is stepped once per iteration."""
from __future__ import annotations

import bisect
import math
from typing import Any

import torch
from torch import nn

from deqlab.errors import ConfigError


def build_optimizer(cfg: Any, model: nn.Module) -> torch.optim.Optimizer:
    """Adam or SGD (momentum, Nesterov) over the trainable parameters, weight decay ``TRAIN.WD``."""
    t = cfg.TRAIN
    params = [p for p in model.parameters() if p.requires_grad]
    name = t.OPTIMIZER.lower()
    if name == "adam":
        return torch.optim.Adam(params, lr=t.LR, weight_decay=t.WD)
    if name == "sgd":
        return torch.optim.SGD(params, lr=t.LR, momentum=t.MOMENTUM, weight_decay=t.WD, nesterov=t.NESTEROV)
    raise ConfigError(f"TRAIN.OPTIMIZER must be 'adam' or 'sgd', got {t.OPTIMIZER!r}")


def build_scheduler(cfg: Any, optimizer: torch.optim.Optimizer,
                    iters_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``cosine``: LR·½(1 + cos(π·t/T)) over the whole run; ``poly``: LR·(1 − t/T)^0.9 (the segmentation
    schedule of HRNet/MDEQ); ``step``: × LR_FACTOR at each epoch of LR_STEP."""
    t = cfg.TRAIN
    total = max(1, (t.END_EPOCH - t.BEGIN_EPOCH) * iters_per_epoch)
    name = t.LR_SCHEDULER.lower()
    if name == "cosine":
        def factor(it: int) -> float:
            return 0.5 * (1 + math.cos(math.pi * min(it, total) / total))
    elif name == "poly":
        def factor(it: int) -> float:
            return (1 - min(it, total) / total) ** 0.9
    elif name == "step":
        milestones = sorted((e - t.BEGIN_EPOCH) * iters_per_epoch for e in t.LR_STEP)

        def factor(it: int) -> float:
            return t.LR_FACTOR ** bisect.bisect_right(milestones, it)
    else:
        raise ConfigError(f"TRAIN.LR_SCHEDULER must be 'cosine', 'poly' or 'step', got {t.LR_SCHEDULER!r}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
