"""Precise BatchNorm: replace the running statistics by true averages over training batches before evaluating.

Why. BatchNorm's running statistics are an exponential moving average, ``r ← (1 − m) r + m · batch``, started
at mean 0 and variance 1 and never bias-corrected. After n iterations (momentum m = 0.1) the starting
variance still weighs 0.9ⁿ. MDEQ initialises its convolutions with N(0, 0.01), so early in training the
inputs of the stem's and the head's BatchNorms have variances of 1e-3 to 1e-2: the leftover 0.9ⁿ dominates
for the first 50-90 iterations (0.9²⁴ ≈ 0.08 is 30-100x the true variance), the eval-mode stem shrinks the
injection several-fold, the equilibrium found in eval mode is a different (nearly input-independent) one,
and test accuracy sits at chance while the same weights in train mode score 50-80 %. The average also lags
weights that move fast early on. Recomputing the statistics as a true average over a few training batches
(detectron2's "PreciseBN") removes both.

``recompute_bn_stats`` measures the exact per-channel mean and variance of every BatchNorm's input over the
given batches (merged over ranks when a process group is up) and, unless ``update=False``, writes them as
the running statistics. Either way it returns a :class:`BNGap` saying how far the old running statistics
were from the measured ones, which :func:`log_gap` turns into a log line (a warning when they disagree and
were kept). Task-agnostic: ``forward(model, batch)`` is the only thing that knows what a batch is.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

log = logging.getLogger("deqlab")

# Running statistics "disagree" when a layer's variance is off by more than x1.25 (its eval-mode std by ~12%)
# or its mean by more than a quarter std. Measured on the Fashion-MNIST quickstart: x1.06 / 0.03 std cost
# nothing (eval 78.4 % = train mode), x1.65 cost 12 points (63 % vs 76 %), x8.75 and more gave chance.
VAR_FACTOR_LIMIT = 1.25
MEAN_SHIFT_LIMIT = 0.25


@dataclass(frozen=True)
class BNGap:
    """How far the running statistics were from the measured ones, per the worst layer.

    ``var_factor``: geometric mean over channels of max(r, 1/r), r = (running var + eps) / (measured var +
    eps), i.e. the factor by which eval-mode normalisation mis-scales that layer's output (squared).
    ``mean_shift``: mean over channels of |running mean − measured mean| / sqrt(measured var + eps).
    """

    var_layer: str
    var_factor: float
    mean_layer: str
    mean_shift: float
    num_layers: int
    num_batches: int

    @property
    def disagrees(self) -> bool:
        return self.var_factor > VAR_FACTOR_LIMIT or self.mean_shift > MEAN_SHIFT_LIMIT

    def __str__(self) -> str:
        return (f"running variance off by x{self.var_factor:.3g} ({self.var_layer}), running mean by "
                f"{self.mean_shift:.2f} std ({self.mean_layer}), worst of {self.num_layers} BatchNorm layers")


class _Moments:
    """Exact per-channel count, mean and second moment of a layer's inputs, accumulated in float64."""

    def __init__(self, like: Tensor) -> None:
        self.count = 0.0
        self.sum = torch.zeros_like(like, dtype=torch.float64)  # Σ x per channel
        self.sumsq = torch.zeros_like(like, dtype=torch.float64)  # Σ x², from each batch's two-pass (var, mean)

    def add(self, x: Tensor) -> None:
        dims = [0] + list(range(2, x.dim()))  # every dimension but the channels: (N, C), (N, C, ...)
        n = x.numel() // x.shape[1]
        var, mean = torch.var_mean(x.detach().float(), dim=dims, unbiased=False)
        mean, var = mean.double(), var.double()
        self.count += n
        self.sum += n * mean
        self.sumsq += n * (var + mean * mean)

    def all_reduce(self) -> None:
        """Sum over ranks, so every rank ends with the same statistics (a no-op without a process group)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        packed = torch.cat([self.sum.new_tensor([self.count]), self.sum, self.sumsq])
        dist.all_reduce(packed)
        c = len(self.sum)
        self.count, self.sum, self.sumsq = packed[0].item(), packed[1:1 + c], packed[1 + c:]

    def mean_var(self) -> tuple[Tensor, Tensor]:
        """Population mean and unbiased variance (BatchNorm's running-variance convention)."""
        mean = self.sum / self.count
        var = (self.sumsq / self.count - mean * mean).clamp_min(0.0) * (self.count / max(self.count - 1.0, 1.0))
        return mean, var


def _gap(layers: dict[str, tuple[_BatchNorm, Tensor, Tensor]], measured: dict[str, tuple[Tensor, Tensor]],
         num_batches: int) -> BNGap:
    var_worst, mean_worst = ("", 1.0), ("", 0.0)
    for name, (bn, old_mean, old_var) in layers.items():
        mean, var = measured[name]
        ratio = (old_var.double() + bn.eps) / (var + bn.eps)
        factor = math.exp(ratio.log().abs().mean().item())
        shift = ((old_mean.double() - mean).abs() / (var + bn.eps).sqrt()).mean().item()
        var_worst = max(var_worst, (name, factor), key=lambda t: t[1])
        mean_worst = max(mean_worst, (name, shift), key=lambda t: t[1])
    return BNGap(var_worst[0], var_worst[1], mean_worst[0], mean_worst[1], len(layers), num_batches)


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, batches: Iterable[Any], num_batches: int,
                       forward: Callable[[nn.Module, Any], Any], update: bool = True) -> BNGap | None:
    """Measure every BatchNorm's input statistics over the first ``num_batches`` of ``batches``.

    ``forward(model, batch)`` runs the test-time forward on one batch (moving it to the device; outputs are
    ignored).
    With ``update`` the measured mean and variance become the running statistics; otherwise the model ends
    unchanged. Returns the gap between the previous running statistics and the measured ones, or None when
    the model has no BatchNorm with running statistics or no batch ran (nothing is changed then).
    """
    bns = {name: m for name, m in model.named_modules()
           if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None}
    if not bns or num_batches < 1:
        return None
    # The statistics must be those of the inputs the eval-mode network feeds each BatchNorm. So the forward
    # is the eval forward on the current weights (for a DEQ: the equilibrium solve of test time, not the
    # unrolled pretraining path, whose states the head never sees at test time) with every module in eval
    # mode (no dropout, which would inflate the variances, Li et al. 2019) except the BatchNorms: they
    # normalise with each batch's statistics, i.e. the train-mode equilibrium, which is the one the eval
    # network reproduces once its running statistics equal the population ones. One pass measures every
    # layer (detectron2's choice); layer-by-layer passes would only refine it.
    modes = {m: m.training for m in model.modules()}
    saved = {name: (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
             for name, bn in bns.items()}
    moments = {name: _Moments(bn.running_mean) for name, bn in bns.items()}
    hooks = [bn.register_forward_pre_hook(lambda _m, args, acc=moments[name]: acc.add(args[0]))
             for name, bn in bns.items()]
    model.eval()
    for bn in bns.values():
        bn.train()
    seen = 0
    try:
        for batch in batches:
            if seen == num_batches:
                break
            forward(model, batch)
            seen += 1
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes.items():
            m.train(training)
        for name, bn in bns.items():  # the forwards above moved the running statistics: put them back
            bn.running_mean.copy_(saved[name][0])
            bn.running_var.copy_(saved[name][1])
            bn.num_batches_tracked.copy_(saved[name][2])
    for acc in moments.values():  # every rank runs this, in the same order, whatever its batches reached
        acc.all_reduce()
    reached = {name: acc.mean_var() for name, acc in moments.items() if acc.count > 0}
    if not reached:
        return None
    gap = _gap({name: (bns[name], *saved[name][:2]) for name in reached}, reached, seen)
    if update:
        for name, (mean, var) in reached.items():
            bns[name].running_mean.copy_(mean)
            bns[name].running_var.copy_(var)
    return gap


def log_gap(gap: BNGap | None, updated: bool, seconds: float) -> None:
    """One log line about a :func:`recompute_bn_stats` call: a warning when stale statistics were kept."""
    if gap is None:
        return
    what = "recomputed" if updated else "measured"
    msg = f"BatchNorm statistics {what} over {gap.num_batches} training batches in {seconds:.1f}s: {gap}"
    if gap.disagrees and not updated:
        log.warning("%s; eval-mode results use these stale statistics and can be far below train-mode ones "
                    "(set TRAIN.PRECISE_BN True)", msg)
    else:
        log.info(msg)
