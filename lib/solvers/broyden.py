"""Broyden's ("good") method on g(z) = f(z) − z with a low-rank inverse-Jacobian estimate.

The inverse Jacobian of g is approximated by H = −I + Σᵢ uᵢ vᵢᵀ, starting from −I (so the first step is a
plain fixed-point step). Each step moves z ← z − H g(z) and applies the Sherman–Morrison update that makes
H satisfy the secant condition H Δg = Δz:

    u = (Δz − H Δg) / (Δzᵀ H Δg),   vᵀ = Δzᵀ H.

Memory: at most ``memory`` rank-one terms are kept (default: all); past that the oldest pair is
overwritten (limited-memory Broyden, as in locuslab/deq), so memory is bounded at 2·memory·N per sample.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from deqlab.solvers.common import History, Tracker, check_args, flatten_cell


class _InverseJacobian:
    """H = −I + Uᵀ V with U, V stored as (B, k, N) histories."""

    def __init__(self, like: Tensor, memory: int) -> None:
        self.us, self.vs = History(like, memory), History(like, memory)

    def matvec(self, x: Tensor) -> Tensor:  # H x
        if not len(self.us):
            return -x
        vx = torch.bmm(self.vs.stacked(), x.unsqueeze(2))
        return -x + torch.bmm(self.us.stacked().transpose(1, 2), vx).squeeze(2)

    def rmatvec(self, x: Tensor) -> Tensor:  # xᵀ H
        if not len(self.us):
            return -x
        ux = torch.bmm(self.us.stacked(), x.unsqueeze(2))
        return -x + torch.bmm(self.vs.stacked().transpose(1, 2), ux).squeeze(2)

    def update(self, dz: Tensor, dg: Tensor) -> None:
        vt = self.rmatvec(dz)
        denom = (vt * dg).sum(dim=1, keepdim=True)
        # A converged sample has Δz = Δg = 0: skip its update (u = 0) rather than divide by zero.
        denom = torch.where(denom.abs() > 1e-30, denom, torch.full_like(denom, float("inf")))
        self.us.append((dz - self.matvec(dg)) / denom)
        self.vs.append(vt)


def broyden(f: Callable[[Tensor], Tensor], z0: Tensor, max_iter: int = 30, tol: float = 1e-3,
            stop_mode: str = "rel", memory: int | None = None) -> tuple[Tensor, dict[str, Any]]:
    """Solve z = f(z) by Broyden's method; ``memory`` bounds the rank-one pairs kept. Returns ``(z, stats)``."""
    check_args(max_iter, tol, stop_mode)
    memory = max_iter if memory is None else memory
    if memory < 1:
        raise ValueError(f"broyden memory must be >= 1, got {memory}")
    f, z = flatten_cell(f, z0)
    tracker = Tracker(z, tol, stop_mode)
    inv_jac = _InverseJacobian(z, min(memory, max_iter))
    fz = f(z)
    g = fz - z
    if tracker.update(z, fz, g):
        return tracker.result(z0.shape)
    for _ in range(max_iter - 1):
        dz = -inv_jac.matvec(g)
        z = z + dz
        fz = f(z)
        g_new = fz - z
        if tracker.update(z, fz, g_new):
            break
        inv_jac.update(dz, g_new - g)
        g = g_new
    return tracker.result(z0.shape)
