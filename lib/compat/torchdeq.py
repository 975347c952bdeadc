"""torchdeq's DEQ flags (``torchdeq.utils.add_deq_args``), as the torchdeq zoo's scripts take them.

Each maps to deqlab's config keys (``FLAGS``), or is refused with the reason where deqlab has no such mode. Two
need the resolved config and are finished by :func:`finish`: ``--eval_factor`` (the test budget is a multiple of
``DEQ.F_THRES``) and ``--b_stop_mode`` (deqlab's two solvers share ``DEQ.STOP_MODE``).
"""
from __future__ import annotations

import argparse
from typing import Any

from deqlab.compat import Flag, choose, words
from deqlab.errors import ConfigError

# torchdeq's solver names -> deqlab's (deqlab.solvers)
SOLVERS = {"anderson": "anderson", "broyden": "broyden", "fixed_point_iter": "fixed_point",
           # the same iteration; torchdeq's "simple" variant only skips the convergence bookkeeping
           "simple_fixed_point_iter": "fixed_point"}

# --norm_type: torchdeq's normalisations are MODEL.NORM_TYPE's values. WNORM True keeps a config whose WNORM is
# False from contradicting an explicit weight or spectral norm (WNORM only matters when NORM_TYPE is auto).
NORM_TYPES: dict[str, list[str] | str] = {
    kind: ["MODEL.WNORM", str(kind != "none"), "MODEL.NORM_TYPE", kind]
    for kind in ("weight_norm", "spectral_norm", "none")
}


def _solver(key: str, flag: str) -> Any:
    return choose({name: [key, ours] for name, ours in SOLVERS.items()}, flag)


def _grad(steps: list[int]) -> list[str]:
    if len(steps) > 1:
        raise ConfigError(f"--grad {' '.join(map(str, steps))}: one phantom-gradient step count per state needs "
                          "several states (--n_states / --indexing), which deqlab does not have; give one number")
    return ["DEQ.GRAD", "phantom", "DEQ.PHANTOM_STEPS", str(steps[0])]


def _sup_gap(gap: int) -> list[str]:
    # torchdeq's -1: only the last phantom state is supervised, i.e. no fixed-point correction
    return ["LOSS.FPC", "True", "LOSS.FPC_GAP", str(gap)] if gap > 0 else ["LOSS.FPC", "False"]


def _jac_incremental(steps: int) -> list[str]:
    return ["LOSS.JAC_INCREMENTAL", str(steps if steps > 0 else 100000000)]  # torchdeq's 0: never increase


FLAGS: dict[str, Flag] = {
    # solver
    "--f_solver": Flag(convert=_solver("DEQ.F_SOLVER", "--f_solver")),
    "--b_solver": Flag(convert=_solver("DEQ.B_SOLVER", "--b_solver")),
    "--f_max_iter": Flag(("DEQ.F_THRES",), int),
    "--b_max_iter": Flag(("DEQ.B_THRES",), int),
    "--f_tol": Flag(("DEQ.F_EPS",), float),
    "--b_tol": Flag(("DEQ.B_EPS",), float),
    "--f_stop_mode": Flag(("DEQ.STOP_MODE",), str),
    "--b_stop_mode": Flag(type=str, convert=lambda mode: []),  # checked against DEQ.STOP_MODE by finish()
    "--eval_factor": Flag(type=float, convert=lambda factor: []),  # TEST.F_THRES from DEQ.F_THRES by finish()
    "--eval_f_max_iter": Flag(("TEST.F_THRES",), int),  # 0: the training budget, in torchdeq and here
    # normalisation
    "--norm_type": Flag(convert=choose(NORM_TYPES, "--norm_type")),
    "--norm_no_scale": Flag(("MODEL.NORM_NO_SCALE",), None),
    "--norm_clip": Flag(("MODEL.NORM_CLIP",), None),
    "--norm_clip_value": Flag(("MODEL.NORM_CLIP_VALUE",), float),
    "--norm_target_norm": Flag(("MODEL.NORM_TARGET_NORM",), float),
    "--sn_n_power_iters": Flag(("MODEL.SN_N_POWER_ITERS",), int),
    # training
    "--core": Flag(type=str, only="sliced",
                   refuse="deqlab's DEQ is torchdeq's sliced core (one solve, then the gradient steps); "
                          "there is no indexing core"),
    "--grad": Flag(type=int, nargs="+", convert=_grad),  # before --ift, which replaces it (as in torchdeq)
    "--ift": Flag(type=None, convert=lambda _: ["DEQ.GRAD", "ift"]),
    "--hook_ift": Flag(type=None, convert=lambda _: ["DEQ.GRAD", "ift"]),  # deqlab's ift is a backward hook
    "--n_states": Flag(type=int, only=1,
                       refuse="deqlab supervises the phantom-gradient states (--sup_gap), not several solver states"),
    "--indexing": Flag(type=int, nargs="+",
                       refuse="deqlab supervises the phantom-gradient states (--sup_gap), not indexed solver states"),
    "--gamma": Flag(("LOSS.FPC_GAMMA",), float),
    "--tau": Flag(("DEQ.PHANTOM_TAU",), float),
    "--sup_gap": Flag(type=int, convert=_sup_gap),
    "--sup_loc": Flag(type=int, nargs="+",
                      refuse="deqlab supervises every --sup_gap-th phantom state; explicit locations are not "
                             "implemented"),
    # regularisation, monitoring
    "--jac_loss_weight": Flag(("LOSS.JAC_LOSS_WEIGHT",), float),
    "--jac_loss_freq": Flag(("LOSS.JAC_LOSS_FREQ",), float),
    "--jac_incremental": Flag(type=int, convert=_jac_incremental),
    "--sradius_mode": Flag(("DEQ.SPECTRAL_RADIUS_MODE",), None),
}


def needs_config(args: argparse.Namespace) -> bool:
    """Whether :func:`finish` has anything to do (it loads the config)."""
    return args.b_stop_mode is not None or (args.eval_factor is not None and not args.eval_f_max_iter)


def finish(args: argparse.Namespace, cfg: Any) -> list[str]:
    """The words of the flags that depend on the resolved config ``cfg`` (see the module docstring)."""
    if args.b_stop_mode is not None and args.b_stop_mode != cfg.DEQ.STOP_MODE:
        raise ConfigError(f"--b_stop_mode {args.b_stop_mode}: deqlab's forward and backward solvers share "
                          f"DEQ.STOP_MODE ({cfg.DEQ.STOP_MODE} here; set it with --f_stop_mode)")
    if args.eval_factor is not None and not args.eval_f_max_iter:
        return words("TEST.F_THRES")(max(1, int(cfg.DEQ.F_THRES * args.eval_factor)))
    return []
