"""deqlab: Deep Equilibrium Models (DEQ) and Multiscale DEQs (MDEQ) in PyTorch.

The library: the :class:`DEQ` layer (``get_deq`` builds one from arguments or a config), the fixed-point
solvers and their registry, the Jacobian regulariser and spectral-radius diagnostic, and the layers whose state
holds for a whole forward pass (normalised weights, variational dropout; call ``reset_per_forward`` first), and
the training objective that adds the DEQ terms to a task's loss (:class:`DEQObjective`).

The names load on first use: ``import deqlab.config`` (the command-line tools' first step) must not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {  # public name -> the module defining it
    "DEQ": "deqlab.deq",
    "get_deq": "deqlab.factory",
    "SOLVERS": "deqlab.solvers",
    "get_solver": "deqlab.solvers",
    "register_solver": "deqlab.solvers",
    "jacobian_frobenius_loss": "deqlab.regularizers",
    "spectral_radius": "deqlab.regularizers",
    "WeightNormConv2d": "deqlab.layers",
    "WeightNormConv1d": "deqlab.layers",
    "WeightNormLinear": "deqlab.layers",
    "SpectralNormConv2d": "deqlab.layers",
    "NormOptions": "deqlab.layers",
    "VariationalDropout2d": "deqlab.layers",
    "reset_per_forward": "deqlab.layers",
    "DEQObjective": "deqlab.objective",
    "fixed_point_correction": "deqlab.objective",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'deqlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
