"""What a task supplies to the engine: its model, loaders, loss and metrics.

The engine (``deqlab.engine``) owns everything written once: the training loop, evaluation, DDP, AMP,
checkpoints and resume, tensorboard, progress bars and error handling. A task is the part that differs
between classification, segmentation and language modelling; it never sees the optimizer or the files.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from deqlab.checkpoint import load_weights
from deqlab.data import build_loader
from deqlab.deq import mean_spectral_radius
from deqlab.solvers.common import SolveSummary, solver_summary
from deqlab.models import build_model
from deqlab.utils.dist import all_reduce_sum


class Meter:
    """Running sums of a metric over batches (``update``), summed over ranks and turned into numbers
    (``result``). Subclasses say how many sums they keep and what they mean."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.sums = torch.zeros(size, dtype=torch.float64, device=device)

    def update(self, output: Tensor, target: Tensor) -> None:
        raise NotImplementedError

    def compute(self, sums: Tensor) -> dict[str, Any]:
        raise NotImplementedError

    def result(self) -> dict[str, Any]:
        """The metrics over every rank's batches."""
        return self.compute(all_reduce_sum(self.sums).cpu())


class Task:
    """The base task: a model from ``build_model(cfg, task=name)``, loaders from ``build_loader``."""

    name = ""
    best_metric = ""                           # evaluation metric that picks model_best
    higher_is_better = True                    # ... and which way is better
    perf_label = ""                            # how the test tools print it
    pretrained_exclude: tuple[str, ...] = ()   # MODEL.PRETRAINED never loads tensors under these prefixes
    sync_batchnorm = False                     # convert BatchNorm to SyncBatchNorm on multi-GPU runs
    find_unused_parameters = False             # DDP: some parameters may get no gradient in a step
    final_test_split = ""                      # a split the train tool evaluates the best weights on at the end

    def __init__(self, cfg: Any, full_test: bool = False) -> None:
        self.cfg = cfg
        self.full_test = full_test  # the test tool's full procedure (e.g. sliding windows), not the quick one

    def build_model(self) -> nn.Module:
        return build_model(self.cfg, task=self.name)

    def build_loader(self, split: str, distributed: bool, augment: bool | None = None) -> DataLoader:
        return build_loader(self.cfg, split, distributed=distributed, augment=augment)

    def forward(self, net: nn.Module, x: Any, **kwargs: Any) -> tuple[Tensor, dict[str, Any]]:
        """The training forward: ``(output, info)`` for the objective (``loss(output, target)`` and the DEQ terms
        in ``info``) and the DEQ stats."""
        return net(x, **kwargs)

    def train_f_thres(self, compute_jac_loss: bool) -> int:
        """This training step's forward budget. MDEQ (locuslab/mdeq): when the Jacobian term is on, F_THRES
        jitters by -RAND_F_THRES_DELTA..+1. Never below one step."""
        delta = self.cfg.DEQ.RAND_F_THRES_DELTA
        jitter = int(torch.randint(-delta, 2, []).item()) if delta > 0 and compute_jac_loss else 0
        return max(1, self.cfg.DEQ.F_THRES + jitter)

    def load_weights(self, model: nn.Module, path: str) -> None:
        """Load a checkpoint's weights for evaluation (all tensors must fit; ``MODEL.WEIGHTS_FORMAT``)."""
        load_weights(model, path, fmt=self.cfg.MODEL.WEIGHTS_FORMAT)

    def result_fields(self) -> dict[str, Any]:
        """Extra columns of the test tools' ``--results_name`` CSV row (e.g. a language model's mem_len)."""
        return {}

    def start_pass(self, train: bool) -> None:
        """Called before each training epoch and each evaluation (a sequence model resets its memory)."""

    def state_dict(self) -> dict[str, Any]:
        """State the task carries between batches (tensors and primitives), saved in the resume checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        """Restore :meth:`state_dict` (a resumed run, a skipped non-finite step)."""

    def checkpoint_state(self) -> dict[str, Any]:
        """What the resume checkpoint holds of the task: :meth:`state_dict`, unless the task gathers every rank's.
        Called on every rank before rank 0 saves, so it may be collective."""
        return self.state_dict()

    def load_checkpoint_state(self, state: dict[str, Any], device: torch.device) -> None:
        """Restore this rank's part of :meth:`checkpoint_state` when a run resumes."""
        self.load_state_dict(state, device)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """The task's loss of one output of the model for a batch (a scalar). The DEQ terms (Jacobian, skip,
        fixed-point correction) are added by the training objective, ``deqlab.objective.DEQObjective``."""
        raise NotImplementedError

    def train_stats(self, output: Tensor, target: Tensor) -> dict[str, float]:
        """Cheap per-batch numbers for the progress bar and tensorboard (e.g. accuracy)."""
        return {}

    def predict(self, model: nn.Module, x: Tensor, f_thres: int | None, train_step: int = -1
                ) -> tuple[Tensor, SolveSummary, float | None]:
        """The evaluation forward: the output, the forward solve's summary (steps, f evaluations, residual) and
        the batch's mean spectral radius at z* (None unless ``DEQ.SPECTRAL_RADIUS_MODE``). ``train_step`` is the
        training step the evaluation happens at; the image tasks ignore it and always solve for the equilibrium,
        as locuslab/mdeq's validation does (train_step=-1, even while pretraining)."""
        output, info = model(x, train_step=-1, f_thres=f_thres)
        return output, solver_summary(info["fwd"]), mean_spectral_radius(info)

    def new_meter(self, device: torch.device) -> Meter:
        raise NotImplementedError

    def describe(self, metrics: dict[str, Any]) -> str:
        """One log line's worth of the evaluation metrics."""
        raise NotImplementedError
