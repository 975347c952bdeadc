"""Plain fixed-point iteration z ← τ f(z) + (1 − τ) z (τ = 1: Picard; τ < 1: damped/Krasnosel'skii–Mann).

Budget and result follow torchdeq's ``fixed_point_iter``: at most ``max_iter`` f evaluations, and the solver
returns, per sample, the *image* of the evaluated iterate with the lowest residual,
z_{k+1} = τ f(z_k) + (1 − τ) z_k. It costs no evaluation and, for a contraction, is closer to the fixed point than z_k; a budget of 1 returns
f(z0), not z0. So every evaluation is a step: ``stats["nstep"] == stats["nfe"]``. The residuals (and the stop
test) are those of the evaluated iterate, ||f(z_k) − z_k|| (torchdeq measures the damped step τ(f(z_k) − z_k):
the same for τ = 1, the only τ its DEQ layer uses).
"""
from __future__ import annotations

from typing import Any, Callable

from torch import Tensor

from deqlab.solvers.common import Tracker, check_args, flatten_cell


def fixed_point(f: Callable[[Tensor], Tensor], z0: Tensor, max_iter: int = 30, tol: float = 1e-3,
                stop_mode: str = "rel", tau: float = 1.0) -> tuple[Tensor, dict[str, Any]]:
    """Iterate f from z0 at most ``max_iter`` evaluations; converges when f is a contraction (ρ(J) < 1).
    Returns ``(z, stats)``, z the image of the best iterate (see the module docstring)."""
    check_args(max_iter, tol, stop_mode)
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"fixed_point damping tau must be in (0, 1], got {tau}")
    f, z = flatten_cell(f, z0)
    tracker = Tracker(z, tol, stop_mode)
    for _ in range(max_iter):
        fz = f(z)
        z_next = fz if tau == 1.0 else tau * fz + (1.0 - tau) * z
        # The candidate is zₖ's image, measured by zₖ's residual. Iterates are never modified in place, so the
        # tracker may hold it by reference.
        if tracker.update(z_next, fz, fz - z, hold=True):
            break
        z = z_next
    return tracker.result(z0.shape, tracker.nfe)
