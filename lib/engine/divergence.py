"""A diverging run stops (or skips the step) instead of training on, and saving, NaNs and infinities.

Once per training step, in the one host sync that fetches the loss anyway, the trainer learns whether the loss,
the Jacobian or auxiliary loss, the forward solve's residual, the gradients, or the weights and buffers as the
previous step left them hold a NaN or an infinity.
``TRAIN.NONFINITE stop`` (the default) ends the run there, with one line naming the step and what went
non-finite; the run's files stay as its last finite validation wrote them. ``skip`` drops the step's update
(and what its forward did to BatchNorm statistics and the task's carried state, e.g. a language model's memory),
as AMP's GradScaler does on an overflow, but at most ``TRAIN.NONFINITE_MAX_SKIPS`` steps in a row. Weights that
an update already made non-finite cannot be skipped: they always stop the run. Under float16 AMP the gradient
scaler keeps handling overflowing gradients itself (skipping the step and lowering the scale), so only the
loss, the residual and the weights are checked there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch import distributed as dist

from deqlab.errors import DeqlabError

__all__ = ["TrainingDiverged", "StepCheck", "DivergenceGuard", "nonfinite_metrics", "check_evaluation"]


class TrainingDiverged(DeqlabError):
    """A training run went non-finite; the message names the step and what, and which files were kept."""


def _count_nonfinite(tensors: list[Tensor], device: torch.device) -> Tensor:
    """How many of ``tensors`` hold a NaN or an infinity, as a 0-d float tensor (no host sync)."""
    if not tensors:
        return torch.zeros((), device=device)
    return torch.stack([~torch.isfinite(t).all() for t in tensors]).sum().float().to(device)


def _float_buffers(model: nn.Module) -> list[Tensor]:
    return [b for b in model.buffers() if b.is_floating_point()]


Undo = tuple[list[Tensor], dict[str, Any]]  # a skip-mode snapshot: copies of the buffers, the task's carried state


_VALUES = ("the loss", "the Jacobian loss", "the auxiliary loss", "the forward solve's residual")


@dataclass(frozen=True)
class StepCheck:
    """What one training step's host sync brings back: this rank's losses and residual, and, as the worst rank
    has them (so that every rank takes the same decision), which of them and how many of the gradient and
    weight tensors are non-finite."""

    values: tuple[float, ...]     # this rank's loss, Jacobian loss, auxiliary loss, forward residual
    nonfinite: tuple[int, ...]    # 1 where one of them is non-finite on some rank
    bad_grads: int
    grads: int
    bad_weights: int
    weights: int

    @classmethod
    def measure(cls, model: nn.Module, loss: Tensor, jac_loss: Tensor | None, aux_loss: Tensor | None,
                fwd_stats: dict[str, Any] | None, check_grads: bool) -> "StepCheck":
        """Fetch the step's numbers and non-finite counts in a single device-to-host copy."""
        zero = torch.zeros((), device=loss.device)
        residual = fwd_stats["rel_lowest"].float().mean() if fwd_stats else zero
        values = torch.stack([t.detach().float().to(loss.device) if t is not None else zero
                              for t in (loss, jac_loss, aux_loss, residual)])
        grads = [p.grad for p in model.parameters() if p.grad is not None] if check_grads else []
        weights = [*model.parameters(), *_float_buffers(model)]
        counts = torch.cat([(~torch.isfinite(values)).float(), torch.stack([_count_nonfinite(grads, loss.device),
                                                                            _count_nonfinite(weights, loss.device)])])
        if dist.is_initialized():  # the worst rank's counts: every rank stops or skips together
            dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        host = torch.cat([values, counts]).tolist()
        flags = [int(v) for v in host[4:]]
        return cls(tuple(host[:4]), tuple(flags[:4]), flags[4], len(grads), flags[5], len(weights))

    def problem(self) -> str:
        """What went non-finite in this step ('' when nothing)."""
        for name, value, flag in zip(_VALUES, self.values, self.nonfinite):
            if flag:
                return f"{name} is {value if not math.isfinite(value) else 'non-finite on another rank'}"
        if self.bad_grads:
            return f"the gradients of {self.bad_grads} of {self.grads} parameters are non-finite"
        return ""


class DivergenceGuard:
    """``TRAIN.NONFINITE``: decides, step by step, whether a non-finite step stops the run or is skipped.

    ``kept()`` says, for the stop message, which of the run's files hold its last finite state."""

    def __init__(self, cfg: Any, kept: Callable[[], str]) -> None:
        self.mode, self.max_skips, self.kept = cfg.TRAIN.NONFINITE, cfg.TRAIN.NONFINITE_MAX_SKIPS, kept
        self.skipped = 0  # consecutive skipped steps

    def stop(self, step: int, what: str) -> TrainingDiverged:
        """The one-line error that ends a run which went non-finite at ``step`` (1-based)."""
        return TrainingDiverged(f"training diverged at step {step}: {what}; {self.kept()}; lower TRAIN.LR or "
                                f"clip the gradients (TRAIN.CLIP)")

    def snapshot(self, model: nn.Module, task: Any) -> Undo | None:
        """In skip mode, what a step's forward changes besides the weights (the buffers, e.g. BatchNorm statistics,
        and the task's carried state), to put back if the step is skipped; None in stop mode (nothing is copied)."""
        if self.mode != "skip":
            return None
        return [b.detach().clone() for b in model.buffers()], task.state_dict()

    def skip(self, step: int, check: StepCheck, undo: Undo | None, model: nn.Module, task: Any) -> str:
        """'' when step ``step`` (1-based) is finite. In skip mode, within the bound, put ``undo`` back and
        return what went non-finite: the caller drops the update. Otherwise raise :class:`TrainingDiverged`."""
        if check.bad_weights:  # the previous update is done: nothing to skip
            raise self.stop(step - 1, f"{check.bad_weights} of {check.weights} weight and buffer tensors are "
                                      f"non-finite after its update")
        problem = check.problem()
        if not problem:
            self.skipped = 0
            return ""
        self.skipped += 1
        if undo is None or self.skipped > self.max_skips:
            bound = f" (after {self.max_skips} steps skipped in a row, TRAIN.NONFINITE_MAX_SKIPS)" if undo else ""
            raise self.stop(step, problem + bound)
        buffers, task_state = undo
        for buffer, saved in zip(model.buffers(), buffers):
            buffer.copy_(saved)
        task.load_state_dict(task_state, next(model.parameters()).device)
        return problem


def nonfinite_metrics(metrics: dict[str, Any]) -> str:
    """'' when an evaluation's loss and forward residual are finite, else which are not (e.g. ``loss nan,
    forward residual inf``). A metric derived by exp (perplexity) may overflow on a finite loss: not checked."""
    bad = [f"{label} {metrics[key]}" for key, label in (("loss", "loss"), ("fwd_residual", "forward residual"))
           if not math.isfinite(metrics[key])]
    return ", ".join(bad)


def check_evaluation(metrics: dict[str, Any], model_file: str) -> None:
    """Refuse, in one line, to report the metrics of an evaluation of ``model_file`` that went non-finite."""
    bad = nonfinite_metrics(metrics)
    if bad:
        raise DeqlabError(f"evaluating {model_file} gave {bad}: the model diverges on this data, no metric to report")
