"""The DEQ layer's keyword arguments from a config: the one place that maps config keys to ``deqlab.DEQ``.

The core (``deqlab.deq``, ``deqlab.solvers``) knows no config names; ``deqlab.get_deq(cfg)`` builds its layer
from :func:`deq_arguments`, and ``defaults.py`` checks every key listed here before a model is built.
"""
from __future__ import annotations

from typing import Any

from deqlab.config.rules import lookup

# DEQ argument -> the config key that sets it
DEQ_KEYS: dict[str, str] = {
    "f_solver": "DEQ.F_SOLVER",
    "b_solver": "DEQ.B_SOLVER",
    "f_max_iter": "DEQ.F_THRES",
    "b_max_iter": "DEQ.B_THRES",
    "f_tol": "DEQ.F_EPS",
    "b_tol": "DEQ.B_EPS",
    "stop_mode": "DEQ.STOP_MODE",
    "grad": "DEQ.GRAD",
    "phantom_steps": "DEQ.PHANTOM_STEPS",
    "phantom_tau": "DEQ.PHANTOM_TAU",
    "f_solver_memory": "DEQ.F_SOLVER_MEMORY",
    "b_solver_memory": "DEQ.B_SOLVER_MEMORY",
    "spectral_radius": "DEQ.SPECTRAL_RADIUS_MODE",
    "pretrain_steps": "TRAIN.PRETRAIN_STEPS",
    "pretrain_depth": "MODEL.NUM_LAYERS",
    "all_unrolled": "TRAIN.ALL_UNROLLED",
}


def deq_arguments(cfg: Any) -> dict[str, Any]:
    """``deqlab.DEQ``'s keyword arguments from the keys of ``cfg`` named in :data:`DEQ_KEYS`."""
    return {arg: lookup(cfg, key) for arg, key in DEQ_KEYS.items()}
