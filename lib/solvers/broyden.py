"""Broyden's ("good") method on g(z) = f(z) − z with a low-rank inverse-Jacobian estimate.

The inverse Jacobian of g is approximated by H = −I + Σᵢ uᵢ vᵢᵀ, starting from −I (so the first step is a
plain fixed-point step). Each step moves z ← z − H g(z) and applies the Sherman–Morrison update that makes
H satisfy the secant condition H Δg = Δz:

    u = (Δz − H Δg) / (Δzᵀ H Δg),   vᵀ = Δzᵀ H.

Budget: ``max_iter`` steps after the evaluation of f(z0), so at most ``max_iter + 1`` f evaluations: the
``threshold`` of locuslab/mdeq's and locuslab/deq's ``broyden`` and torchdeq's ``max_iter``. ``stats["nstep"]``
counts the steps taken, ``stats["nfe"]`` the evaluations (``nstep + 1``).

Memory: at most ``memory`` rank-one terms are kept (default: all); past that the oldest pair is
overwritten (limited-memory Broyden, as in locuslab/deq), so memory is bounded at 2·memory·N per sample.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from deqlab.solvers.common import Tracker, check_args, flatten_cell


class _InverseJacobian:
    """H = −I + Σᵢ uᵢ vᵢᵀ as lists of pairs, for the grad-enabled path.

    Products are sums of rank-one terms rather than bmm over stacked histories: a stack would be a new
    (B, k, N) tensor saved for backward at every step, O(k²·N) memory over a solve; the terms only save
    references to the pairs themselves, O(k·N).
    """

    def __init__(self, memory: int) -> None:
        self.memory = memory
        self.us: list[Tensor] = []
        self.vs: list[Tensor] = []

    def matvec(self, x: Tensor) -> Tensor:  # H x
        out = -x
        for u, v in zip(self.us, self.vs):
            out = out + u * torch.linalg.vecdot(v, x).unsqueeze(1)
        return out

    def rmatvec(self, x: Tensor) -> Tensor:  # xᵀ H
        out = -x
        for u, v in zip(self.us, self.vs):
            out = out + v * torch.linalg.vecdot(u, x).unsqueeze(1)
        return out

    def update(self, dz: Tensor, dg: Tensor) -> None:
        vt = self.rmatvec(dz)
        denom = (vt * dg).sum(dim=1, keepdim=True)
        # A converged sample has Δz = Δg = 0: skip its update (u = 0) rather than divide by zero.
        denom = torch.where(denom.abs() > 1e-30, denom, torch.full_like(denom, float("inf")))
        u = (dz - self.matvec(dg)) / denom
        self.us, self.vs = (self.us + [u])[-self.memory:], (self.vs + [vt])[-self.memory:]


def broyden(f: Callable[[Tensor], Tensor], z0: Tensor, max_iter: int = 30, tol: float = 1e-3,
            stop_mode: str = "rel", memory: int | None = None) -> tuple[Tensor, dict[str, Any]]:
    """Solve z = f(z) by Broyden's method with at most ``max_iter`` steps after f(z0); ``memory`` bounds the
    rank-one pairs kept. Returns ``(z, stats)``."""
    check_args(max_iter, tol, stop_mode)
    memory = max_iter if memory is None else memory
    if memory < 1:
        raise ValueError(f"broyden memory must be >= 1, got {memory}")
    f, z = flatten_cell(f, z0)
    tracker = Tracker(z, tol, stop_mode)
    fz = f(z)
    g = fz - z
    if tracker.update(z, fz, g):
        return tracker.result(z0.shape, 0)
    if torch.is_grad_enabled():
        return _broyden_tracked(f, z, g, tracker, max_iter, memory, z0.shape)
    # In place, with the algebra arranged so a step costs one H·x and one xᵀ·H (2k passes each over the
    # k stored pairs) rather than three. With w = H g⁺ (old H, new residual) and Δz = −H g:
    #   H Δg = w + Δz,  so  u = (Δz − H Δg)/(Δzᵀ H Δg) = −w / (Δzᵀ(w + Δz)),  vᵀ = Δzᵀ H,
    #   and the next step −H⁺ g⁺ = −w − u (vᵀ g⁺) = w (vᵀg⁺ / d − 1), d = Δzᵀ(w + Δz): no further H·x.
    # Pairs live in slot-major rings (memory, B, N) so (B, k, N) views feed bmm without copies.
    b, n_state = z.shape
    mem = min(memory, max(max_iter - 1, 1))  # pairs are stored after steps 0 .. max_iter - 2 (the last stores none)
    us, vs = z.new_empty(mem, b, n_state), z.new_empty(mem, b, n_state)
    z_bufs = (torch.empty_like(z), torch.empty_like(z))  # ping-pong: zₖ stays intact while zₖ₊₁ is written
    w, vt, tmp = (torch.empty_like(z) for _ in range(3))
    dz = g.clone()  # H₀ = −I: the first step is a fixed-point step
    g = torch.empty_like(z)
    for k in range(max_iter):
        z = torch.add(z, dz, out=z_bufs[k % 2])
        fz = f(z)
        torch.sub(fz, z, out=g)
        if tracker.update(z, fz, g, hold=True) or k == max_iter - 1:  # no update for a step never taken
            break
        n, slot = min(k, mem), k % mem
        if n:
            u_hist, v_hist = us[:n].transpose(0, 1), vs[:n].transpose(0, 1)  # (B, n, N)
            torch.bmm(torch.bmm(g.unsqueeze(1), v_hist.transpose(1, 2)), u_hist, out=w.unsqueeze(1))
            w.sub_(g)  # w = H g = −g + Σ uᵢ (vᵢ·g)
            torch.bmm(torch.bmm(dz.unsqueeze(1), u_hist.transpose(1, 2)), v_hist, out=vt.unsqueeze(1))
            vt.sub_(dz)  # vᵀ = Δzᵀ H = −Δz + Σ vᵢ (uᵢ·Δz)
        else:
            torch.neg(g, out=w)
            torch.neg(dz, out=vt)
        denom = torch.linalg.vecdot(dz, torch.add(w, dz, out=tmp)).unsqueeze(1)
        # A converged sample has Δz = 0: skip its update (u = 0) rather than divide by zero.
        denom = torch.where(denom.abs() > 1e-30, denom, torch.full_like(denom, float("inf")))
        vg = torch.linalg.vecdot(vt, g).unsqueeze(1)
        torch.mul(w, vg / denom - 1.0, out=dz)  # the next step, −H⁺ g⁺
        torch.mul(w, -1.0 / denom, out=us[slot])
        vs[slot].copy_(vt)
    return tracker.result(z0.shape, tracker.nfe - 1)


def _broyden_tracked(f: Callable[[Tensor], Tensor], z: Tensor, g: Tensor, tracker: Tracker, max_iter: int,
                     memory: int, shape: torch.Size) -> tuple[Tensor, dict[str, Any]]:
    """The grad-enabled path: every update out of place (pairs as lists), so autograd sees the whole solve."""
    inv_jac = _InverseJacobian(min(memory, max_iter))
    for k in range(max_iter):
        dz = -inv_jac.matvec(g)
        z = z + dz
        fz = f(z)
        g_new = fz - z
        if tracker.update(z, fz, g_new) or k == max_iter - 1:
            break
        inv_jac.update(dz, g_new - g)
        g = g_new
    return tracker.result(shape, tracker.nfe - 1)
