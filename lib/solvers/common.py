"""Bookkeeping shared by every solver: per-sample residuals, the best iterate, traces and the stop test.

Residuals are per sample: abs = ||f(z) − z||₂ and rel = abs / (||f(z)||₂ + EPS). A solve stops when every
sample is under ``tol`` in ``stop_mode``, when f produces a non-finite value, or when the budget is spent.
Each f evaluation measures the residual of the iterate it was applied to; the solver returns, per sample, the
iterate with the lowest residual seen (fixed-point iteration returns that iterate's image, see its module).

Budgets and counts. ``max_iter`` means what the budget of the original solver meant (see each solver):
Broyden takes ``max_iter`` steps after evaluating f(z0) (``max_iter + 1`` evaluations, as locuslab/mdeq's and
locuslab/deq's ``threshold`` and torchdeq's ``max_iter``); Anderson evaluates f ``max_iter`` times (locuslab/deq's
``threshold``); fixed-point iteration evaluates f ``max_iter`` times (torchdeq's ``max_iter``). Every solver's
stats report both counts: ``nstep``, the steps taken (new iterates made from z0), and ``nfe``, f evaluations.

Host syncs: one per step, which brings the per-sample residuals to the host for the stop test, the
non-finite check and the best-iterate bookkeeping. Traces stay on the device until the end. Under
``torch.no_grad()`` buffers are updated in place; with grad enabled (the ``unrolled`` gradient mode) every
update is out of place so autograd can backprop through the whole solve.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor

EPS = 1e-8  # keeps rel finite when f(z) = 0
STOP_MODES = ("abs", "rel")
Cell = Callable[[Tensor], Tensor]


def flatten_cell(f: Cell, z0: Tensor) -> tuple[Cell, Tensor]:
    """View f and z0 on (B, N) tensors whatever the trailing shape of z0."""
    shape = z0.shape
    return (lambda z: f(z.reshape(shape)).reshape(shape[0], -1)), z0.reshape(shape[0], -1)


def check_args(max_iter: int, tol: float, stop_mode: str) -> None:
    """A ValueError unless the budget, tolerance and stop mode are valid (every solver checks its own; the DEQ
    layer checks its two at construction)."""
    if stop_mode not in STOP_MODES:
        raise ValueError(f"unknown stop_mode {stop_mode!r}; expected one of {', '.join(STOP_MODES)}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")


class Tracker:
    """Tracks residuals of a batched solve; ``update`` returns True when the solve should stop.

    Per step it computes two norms on the device and brings the (2, B) residuals to the host in the step's one
    sync; the best-iterate bookkeeping and the stop test then run on the host, so updating the best iterate
    costs one copy (every sample improved, the usual case), an indexed copy (some did) or nothing.
    """

    def __init__(self, z0: Tensor, tol: float, stop_mode: str) -> None:
        self.tol, self.stop_mode = tol, stop_mode
        self.tracked = torch.is_grad_enabled()
        self.best_z = z0 if self.tracked else z0.detach().clone()
        self.dtype = torch.float32 if z0.dtype == torch.float16 else z0.dtype
        self.best_abs = [float("inf")] * z0.shape[0]
        self.best_rel = [float("inf")] * z0.shape[0]
        self.held: Tensor | None = None  # an iterate best for every sample, held by reference (see update)
        self.traces: list[Tensor] = []  # (2, B) per f evaluation: abs and rel residuals, kept on the device
        self.nfe = 0  # f evaluations: one per update
        self.nonfinite = False
        self.converged = False

    def update(self, z: Tensor, fz: Tensor, residual: Tensor | None = None, hold: bool = False) -> bool:
        """Record iterate ``z``, its image ``fz`` (and ``fz − z`` if already computed).

        ``hold=True`` promises that ``z`` stays unmodified until the next ``update`` returns: when ``z`` is then
        the best iterate of every sample (the usual case) it is kept by reference instead of copied, and only
        copied out if a later iterate is not better everywhere. Returns True when every sample is under tol
        or f produced a non-finite value.
        """
        self.nfe += 1
        with torch.no_grad():
            residual = fz - z if residual is None else residual
            abs_res = torch.linalg.vector_norm(residual, dim=1, dtype=self.dtype)
            rel_res = abs_res / (torch.linalg.vector_norm(fz, dim=1, dtype=self.dtype) + EPS)
            both = torch.stack([abs_res, rel_res])
        self.traces.append(both)
        abs_list, rel_list = both.tolist()  # the one host sync per step
        res, best = (rel_list, self.best_rel) if self.stop_mode == "rel" else (abs_list, self.best_abs)
        better = [r < b for r, b in zip(res, best)]  # False for NaN: a non-finite iterate never becomes the best
        if not self.tracked and self.held is not None and not all(better):
            self.best_z.copy_(self.held)  # the held iterate stops being best somewhere: copy it out first
        self.held = None
        if all(better):
            self.best_abs, self.best_rel = abs_list, rel_list
            if self.tracked:
                self.best_z = z
            elif hold:
                self.held = z
            else:
                self.best_z.copy_(z)
        elif any(better):
            idx = [i for i, ok in enumerate(better) if ok]
            for i in idx:
                self.best_abs[i], self.best_rel[i] = abs_list[i], rel_list[i]
            if self.tracked:  # out of place: best_z may be saved for backward (or be the caller's z0)
                mask = torch.tensor(better, device=z.device).reshape(-1, *([1] * (z.dim() - 1)))
                self.best_z = torch.where(mask, z, self.best_z)
            else:
                index = torch.tensor(idx, device=z.device)
                self.best_z.index_copy_(0, index, z.detach().index_select(0, index))
        self.nonfinite = not all(math.isfinite(a) for a in abs_list)
        self.converged = all(r < self.tol for r in res)
        return self.converged or self.nonfinite

    def result(self, shape: torch.Size, nstep: int) -> tuple[Tensor, dict[str, Any]]:
        """The best iterate reshaped to ``shape`` and the stats; ``nstep`` is the solver's count of steps."""
        traces = torch.stack(self.traces).amax(dim=2).cpu()  # (nfe, 2): the worst sample per evaluation
        stats = {
            "nstep": nstep,
            "nfe": self.nfe,
            "abs_lowest": torch.tensor(self.best_abs, dtype=self.dtype, device=self.best_z.device),
            "rel_lowest": torch.tensor(self.best_rel, dtype=self.dtype, device=self.best_z.device),
            "abs_trace": traces[:, 0],
            "rel_trace": traces[:, 1],
            "nonfinite": self.nonfinite,
            "converged": self.converged,
            "stop_mode": self.stop_mode,
            "tol": self.tol,
        }
        best = self.best_z if self.held is None else self.held
        return best.reshape(shape), stats


class SolveSummary(NamedTuple):
    """What the logs, progress bars and CSV rows report of one solve."""
    steps: float  # solver steps (``stats["nstep"]``)
    nfe: float  # f evaluations (``stats["nfe"]``)
    residual: float  # mean final relative residual


def solver_summary(stats: dict | None) -> SolveSummary:
    """The :class:`SolveSummary` of one solve's stats; zeros when there was none."""
    if not stats:
        return SolveSummary(0.0, 0.0, 0.0)
    return SolveSummary(float(stats["nstep"]), float(stats["nfe"]), float(stats["rel_lowest"].float().mean()))


def mean_summary(summaries: Sequence[SolveSummary]) -> SolveSummary:
    """The field-wise mean of several solves' summaries (e.g. the windows of one image)."""
    return SolveSummary(*(sum(column) / len(summaries) for column in zip(*summaries)))
