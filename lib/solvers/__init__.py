"""Fixed-point solvers for z = f(z): pure functions ``z, stats = solver(f, z0, max_iter, tol, stop_mode, **opts)``.

``f`` maps a batched tensor (B, ...) to one of the same shape; residuals and stopping are per sample, and each
solver returns the per-sample lowest-residual iterate with ``stats`` (see ``deqlab.solvers.common``).
Solvers are found by name: ``get_solver("anderson")``; ``register_solver(name, fn)`` adds one.

``max_iter`` is the budget in the unit of the original solver each comes from: Broyden's steps after f(z0)
(``max_iter + 1`` f evaluations), Anderson's and fixed-point iteration's f evaluations. ``max_evals`` and
``budget_for_evals`` convert, e.g. to compare solvers at equal f evaluations.
"""
from __future__ import annotations

from typing import Callable

from deqlab.solvers.anderson import anderson
from deqlab.solvers.broyden import broyden
from deqlab.solvers.fixed_point import fixed_point

SOLVERS: dict[str, Callable] = {}


def register_solver(name: str, fn: Callable | None = None):
    """Register ``fn`` under ``name``; usable as ``register_solver(name, fn)`` or as a decorator."""
    def add(func: Callable) -> Callable:
        SOLVERS[name] = func
        return func
    return add(fn) if fn is not None else add


def get_solver(name: str) -> Callable:
    """The solver registered as ``name``; an unknown name lists the known ones."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; known solvers: "
                          f"{', '.join(sorted(SOLVERS))}")
    return SOLVERS[name]


# The option through which each solver bounds the history it keeps: Broyden's rank-one pairs, Anderson's window.
MEMORY_OPTIONS = {"broyden": "memory", "anderson": "m"}


def memory_options(name: str, memory: int) -> dict[str, int]:
    """The options that bound solver ``name``'s history to ``memory`` past iterates; 0 keeps its default."""
    if memory == 0:
        return {}
    if name not in MEMORY_OPTIONS:
        raise ValueError(f"memory={memory}: solver {name!r} keeps no history (only "
                         f"{', '.join(sorted(MEMORY_OPTIONS))} do); use 0")
    return {MEMORY_OPTIONS[name]: memory}


# f evaluations a solver spends beyond max_iter when it spends its whole budget; 0 for a solver not listed.
EXTRA_EVALS = {"broyden": 1}


def max_evals(name: str, max_iter: int) -> int:
    """The most f evaluations solver ``name`` spends at budget ``max_iter``."""
    return max_iter + EXTRA_EVALS.get(name, 0)


def budget_for_evals(name: str, evals: int) -> int:
    """The budget (``max_iter``) at which solver ``name`` spends at most ``evals`` f evaluations
    (at least 1)."""
    return max(1, evals - EXTRA_EVALS.get(name, 0))


for _fn in (broyden, anderson, fixed_point):
    register_solver(_fn.__name__, _fn)

__all__ = ["get_solver", "register_solver", "memory_options", "MEMORY_OPTIONS", "broyden", "anderson", "fixed_point",
           "SOLVERS", "EXTRA_EVALS", "max_evals", "budget_for_evals"]
