"""Optimizer, learning-rate schedule and DEQ objective from the config; the schedule is stepped once per iteration."""
from __future__ import annotations

import bisect
import math
from typing import Any

import torch
from torch import nn

from deqlab.errors import ConfigError
from deqlab.objective import DEQObjective

OPTIMIZERS = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam, "sgd": torch.optim.SGD}


def build_optimizer(cfg: Any, model: nn.Module) -> torch.optim.Optimizer:
    """Adam, RAdam or SGD (momentum, Nesterov) over the trainable parameters, weight decay ``TRAIN.WD``."""
    t = cfg.TRAIN
    params = [p for p in model.parameters() if p.requires_grad]
    name = t.OPTIMIZER.lower()
    if name not in OPTIMIZERS:
        raise ConfigError(f"TRAIN.OPTIMIZER must be one of {', '.join(OPTIMIZERS)}, got {t.OPTIMIZER!r}")
    if name == "sgd":
        return torch.optim.SGD(params, lr=t.LR, momentum=t.MOMENTUM, weight_decay=t.WD, nesterov=t.NESTEROV)
    return OPTIMIZERS[name](params, lr=t.LR, weight_decay=t.WD)


def build_objective(cfg: Any) -> DEQObjective:
    """The training objective of ``LOSS.*`` (Jacobian schedule, Skip DEQ weight, fixed-point correction) and
    ``TRAIN.PRETRAIN_STEPS``."""
    loss = cfg.LOSS
    return DEQObjective(jac_weight=loss.JAC_LOSS_WEIGHT, jac_freq=loss.JAC_LOSS_FREQ,
                        jac_incremental=loss.JAC_INCREMENTAL, jac_stop_epoch=loss.JAC_STOP_EPOCH,
                        pretrain_steps=cfg.TRAIN.PRETRAIN_STEPS, pretrain_jac_weight=loss.PRETRAIN_JAC_LOSS_WEIGHT,
                        skip_weight=loss.SKIP_WEIGHT, fpc_weights=loss.FPC_WEIGHTS, fpc_gamma=loss.FPC_GAMMA)


class LRFactor:
    """The learning-rate multiplier at iteration ``it`` (a callable object, so LambdaLR checkpoints its state).

    - warm-up: linear from 0 over ``TRAIN.WARMUP_STEPS`` (all schedules but ``inv_sqrt``, which has its own);
    - ``cosine``: ½(1 + cos(π·t/T)) down to ``TRAIN.LR_MIN``; ``poly``: (1 − t/T)^0.9 (HRNet/MDEQ segmentation);
      ``step``: × LR_FACTOR at each epoch of LR_STEP; ``constant``;
    - ``inv_sqrt`` (locuslab/deq): t / W^1.5 during the W warm-up steps, then 1/√t;
    - ``plateau`` (locuslab/deq's ``dev_perf``): constant, × LR_FACTOR when the validation loss has not improved
      for more than ``TRAIN.PATIENCE`` validations (``observe``), never below ``TRAIN.LR_MIN``.

    T is ``TRAIN.MAX_STEP`` when set, else the epochs times the iterations per epoch.
    """

    def __init__(self, cfg: Any, iters_per_epoch: int) -> None:
        t = cfg.TRAIN
        self.name = t.LR_SCHEDULER.lower()
        self.total = t.MAX_STEP if t.MAX_STEP > 0 else max(1, (t.END_EPOCH - t.BEGIN_EPOCH) * iters_per_epoch)
        self.warmup, self.floor = t.WARMUP_STEPS, t.LR_MIN / t.LR
        self.factor, self.patience = t.LR_FACTOR, t.PATIENCE
        self.milestones = sorted((e - t.BEGIN_EPOCH) * iters_per_epoch for e in t.LR_STEP)
        self.scale, self.best, self.bad = 1.0, math.inf, 0  # plateau state

    def __call__(self, it: int) -> float:
        if self.name == "inv_sqrt":
            if it == 0 and self.warmup == 0:
                return 1.0
            return it / self.warmup ** 1.5 if it <= self.warmup else 1 / math.sqrt(it)
        if it < self.warmup:
            return it / self.warmup
        progress = min(it, self.total) / self.total
        if self.name == "cosine":
            return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.name == "poly":
            return (1 - progress) ** 0.9
        if self.name == "step":
            return self.factor ** bisect.bisect_right(self.milestones, it)
        return self.scale  # constant, plateau

    def observe(self, loss: float) -> None:
        if self.name != "plateau":
            return
        if loss < self.best:
            self.best, self.bad = loss, 0
        else:
            self.bad += 1
            if self.bad > self.patience:
                self.scale, self.bad = max(self.scale * self.factor, self.floor), 0


SCHEDULES = ("cosine", "poly", "step", "constant", "inv_sqrt", "plateau")


def build_scheduler(cfg: Any, optimizer: torch.optim.Optimizer,
                    iters_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The ``TRAIN.LR_SCHEDULER`` schedule (see :class:`LRFactor`), stepped every iteration."""
    if cfg.TRAIN.LR_SCHEDULER.lower() not in SCHEDULES:
        raise ConfigError(f"TRAIN.LR_SCHEDULER must be one of {', '.join(SCHEDULES)}, got {cfg.TRAIN.LR_SCHEDULER!r}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LRFactor(cfg, iters_per_epoch))


def observe_validation(scheduler: torch.optim.lr_scheduler.LambdaLR, loss: float) -> None:
    """Tell the schedule a validation loss (the ``plateau`` schedule decays on it)."""
    for factor in scheduler.lr_lambdas:
        if isinstance(factor, LRFactor):
            factor.observe(loss)
