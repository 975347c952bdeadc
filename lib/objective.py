"""The training objective of a DEQ: the task loss plus the DEQ-specific terms, assembled in one place.

    total = task + w_jac(step, epoch) · jac + skip_weight · skip

- ``task``: the task's loss of the model's output. A model trained with the fixed-point correction (Geng et
  al., NeurIPS 2021; torchdeq's ``fp_correction``) also returns its output for each phantom iterate in
  ``info["trajectory_outputs"]`` (last = the output); the task term is then :func:`fixed_point_correction` of
  the task losses of those outputs.
- ``jac``: the Jacobian regulariser ``info["jac_loss"]`` (present on the steps that computed it), weighted by
  locuslab/mdeq's schedule (:meth:`DEQObjective.jac_weight_at`).
- ``skip``: Skip DEQ's ``info["skip_loss"]`` = mean((z0 − z*)²) (Pal et al., 2022), when the model predicts z0.

:class:`DEQObjective` takes plain numbers; ``deqlab.engine.optim.build_objective`` reads them from a config.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

FPC_WEIGHTS = ("const", "linear", "exp")

Criterion = Callable[[Tensor, Any], Tensor]  # (output, target) -> scalar loss


def fpc_weights(n: int, weights: str = "exp", gamma: float = 0.8) -> list[float]:
    """The weights w_0 .. w_{n-1} of :func:`fixed_point_correction` (k = n − 1 is the last state):

    - ``exp``:    w_k = γ^(n − k − 1)                       (torchdeq's default; the last state weighs 1)
    - ``linear``: w_k = 1 − (n − k − 1) / n · γ            (torchdeq's ``_linear`` with bias 0)
    - ``const``:  w_k = 1

    torchdeq's ``const`` returns a length-n tensor of ones per term (a vector loss, and it rejects the
    ``gamma`` its caller passes); the intended weight 1 is what is used here.
    """
    if n < 1:
        raise ValueError(f"fixed-point correction needs at least one loss, got {n}")
    if weights == "exp":
        return [gamma ** (n - k - 1) for k in range(n)]
    if weights == "linear":
        return [1.0 - (n - k - 1) / n * gamma for k in range(n)]
    if weights == "const":
        return [1.0] * n
    raise ValueError(f"unknown fixed-point correction weights {weights!r}; expected one of {', '.join(FPC_WEIGHTS)}")


def fixed_point_correction(losses: Sequence[Tensor], weights: str = "exp", gamma: float = 0.8) -> Tensor:
    """Σ_k w_k · losses[k] for the losses of states ordered towards the fixed point (weights: :func:`fpc_weights`).

    The same combination as torchdeq's ``fp_correction(crit, (outputs, target), weight_func=weights,
    gamma=gamma)`` given ``losses[k] = crit(outputs[k], target)``; one loss gives that loss unchanged.
    """
    return sum(w * loss for w, loss in zip(fpc_weights(len(losses), weights, gamma), losses))


@dataclass(frozen=True)
class ObjectiveTerms:
    """One step's objective: ``total`` (what is differentiated) and its terms, named as the trainer logs them
    (progress bar, tensorboard, CSV) and as its non-finite check reads them."""

    total: Tensor
    loss: Tensor               # the task term (the fixed-point correction of the iterates' losses with FPC)
    jac_loss: Tensor | None    # the Jacobian regulariser, unweighted; None on a step that did not compute it
    aux_loss: Tensor | None    # the weighted skip term; None when the model does not predict z0


@dataclass(frozen=True)
class DEQObjective:
    """The DEQ training objective (module docstring). Defaults are the config's (``LOSS.*``).

    Jacobian schedule (locuslab/mdeq): ``pretrain_jac_weight`` during the first ``pretrain_steps`` steps;
    then ``jac_weight`` plus 0.1 for every ``jac_incremental`` steps since pretraining ended, and 0 from
    epoch ``jac_stop_epoch`` on. A step computes the term with probability ``jac_freq`` when its weight is > 0.
    """

    jac_weight: float = 0.0
    jac_freq: float = 0.0
    jac_incremental: int = 100_000_000
    jac_stop_epoch: int = 100_000_000
    pretrain_steps: int = 0
    pretrain_jac_weight: float = 0.0
    skip_weight: float = 0.01
    fpc_weights: str = "exp"
    fpc_gamma: float = 0.8

    def __post_init__(self) -> None:  # a typo would otherwise only fail at the first step with a trajectory
        if self.fpc_weights not in FPC_WEIGHTS:
            raise ValueError(f"fpc_weights must be one of {', '.join(FPC_WEIGHTS)}, got {self.fpc_weights!r}")
        if self.jac_incremental < 1:
            raise ValueError(f"jac_incremental must be >= 1, got {self.jac_incremental}")

    def jac_weight_at(self, step: int, epoch: int) -> float:
        """The Jacobian term's weight at training step ``step`` (0-based) of epoch ``epoch``."""
        deq_steps = step - self.pretrain_steps
        if deq_steps < 0:
            return self.pretrain_jac_weight
        if epoch >= self.jac_stop_epoch:
            return 0.0
        return self.jac_weight + 0.1 * (deq_steps // self.jac_incremental)

    def draw_jac(self, step: int, epoch: int) -> bool:
        """Whether this step computes the Jacobian term (to pass as the model's ``compute_jac_loss``). Draws
        from torch's generator only when the weight is > 0, so runs without the term keep their random stream."""
        return self.jac_weight_at(step, epoch) > 0 and torch.rand([]).item() < self.jac_freq

    def __call__(self, criterion: Criterion, output: Tensor, target: Any, info: Mapping[str, Any], step: int,
                 epoch: int) -> ObjectiveTerms:
        """The objective of one training step: ``criterion(output, target)`` is the task's loss, ``info`` the
        model's DEQ info (``jac_loss``, ``skip_loss``, optionally ``trajectory_outputs``)."""
        outputs = info.get("trajectory_outputs")
        if outputs:
            loss = fixed_point_correction([criterion(o, target) for o in outputs], self.fpc_weights, self.fpc_gamma)
        else:
            loss = criterion(output, target)
        jac, skip = info.get("jac_loss"), info.get("skip_loss")
        total = loss if jac is None else loss + self.jac_weight_at(step, epoch) * jac
        aux = None if skip is None else self.skip_weight * skip
        if aux is not None:
            total = total + aux
        return ObjectiveTerms(total, loss, jac, aux)
