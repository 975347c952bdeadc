"""deqlab: Deep Equilibrium Models (DEQ) and Multiscale DEQs (MDEQ) in PyTorch."""
# PROVISIONAL: the top-level API, to be replaced by the core branch's lib/__init__.py at merge.
from deqlab.deq import DEQ
from deqlab.layers import (NormOptions, SpectralNormConv2d, VariationalDropout2d, WeightNormConv1d, WeightNormConv2d,
                           WeightNormLinear, reset_per_forward)
from deqlab.regularizers import jacobian_frobenius_loss, spectral_radius
from deqlab.solvers import SOLVERS, get_solver, register_solver

__version__ = "0.1.0"


def get_deq(cfg=None, **kwargs):
    return DEQ(**kwargs)


__all__ = ["DEQ", "get_deq", "SOLVERS", "get_solver", "register_solver", "jacobian_frobenius_loss", "spectral_radius",
           "WeightNormConv2d", "WeightNormConv1d", "WeightNormLinear", "SpectralNormConv2d", "NormOptions",
           "VariationalDropout2d", "reset_per_forward"]
