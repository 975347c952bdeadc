"""Plain fixed-point iteration z ← τ f(z) + (1 − τ) z (τ = 1: Picard; τ < 1: damped/Krasnosel'skii–Mann)."""
from __future__ import annotations

from typing import Any, Callable

from torch import Tensor

from deqlab.solvers.common import Tracker, check_args, flatten_cell


def fixed_point(f: Callable[[Tensor], Tensor], z0: Tensor, max_iter: int = 30, tol: float = 1e-3,
                stop_mode: str = "rel", tau: float = 1.0) -> tuple[Tensor, dict[str, Any]]:
    """Iterate f from z0; converges when f is a contraction (ρ(J) < 1). Returns ``(z, stats)``."""
    check_args(max_iter, tol, stop_mode)
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"fixed_point damping tau must be in (0, 1], got {tau}")
    f, z = flatten_cell(f, z0)
    tracker = Tracker(z, tol, stop_mode)
    for k in range(max_iter):
        fz = f(z)
        # Iterates are never modified in place, so the tracker may hold zₖ by reference (z₀ is the caller's).
        if tracker.update(z, fz, hold=k > 0):
            break
        z = fz if tau == 1.0 else tau * fz + (1.0 - tau) * z
    return tracker.result(z0.shape)
