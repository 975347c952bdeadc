"""DEQ.F_SOLVER_MEMORY / DEQ.B_SOLVER_MEMORY: the history each solver keeps, from the config to the solve."""
import re

import pytest
import torch

from deqlab.config import load_config
from deqlab.errors import ConfigError
from deqlab.models import build_model
from deqlab.solvers import memory_options

from conftest import REPO, TINY_OVERRIDES

CLS_CFG = REPO / "experiments/fashion_mnist/cls_mdeq_quickstart.yaml"
LM_CFG = REPO / "experiments/austen/deq_transformer_quickstart.yaml"


def test_memory_options_name_each_solvers_own_option():
    assert memory_options("broyden", 4) == {"memory": 4}
    assert memory_options("anderson", 3) == {"m": 3}
    assert memory_options("fixed_point", 0) == {} and memory_options("broyden", 0) == {}
    with pytest.raises(ValueError, match=re.escape("memory=2: solver 'fixed_point' keeps no history")) as err:
        memory_options("fixed_point", 2)
    assert not isinstance(err.value, ConfigError)


def tiny(*overrides):
    cfg = load_config(CLS_CFG, TINY_OVERRIDES + ["DEQ.F_SOLVER", "broyden", "DEQ.B_SOLVER", "broyden", "DEQ.F_EPS",
                                                 "0", "DEQ.F_THRES", "12", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg, "cls")
    with torch.no_grad():  # a cell far from the identity, so the solver's history matters
        for p in model.fullstage.parameters():
            p.mul_(30.0)
    return model.eval()


def test_the_config_bounds_the_solvers_history():
    full, bounded = tiny(), tiny("DEQ.F_SOLVER_MEMORY", "2", "DEQ.B_SOLVER_MEMORY", "3")
    assert full.deq.f_solver_options == {} and full.deq.b_solver_options == {}
    assert bounded.deq.f_solver_options == {"memory": 2} and bounded.deq.b_solver_options == {"memory": 3}
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        (a, info_a), (b, info_b) = full(x), bounded(x)
    assert info_a["fwd"]["nstep"] == info_b["fwd"]["nstep"] == 12
    # same weights, same budget: only the kept history differs, and so do the iterates
    assert not torch.allclose(a, b, atol=1e-6)
    anderson = tiny("DEQ.F_SOLVER", "anderson", "DEQ.F_SOLVER_MEMORY", "2")
    assert anderson.deq.f_solver_options == {"m": 2}


def test_bad_memory_values_are_refused():
    with pytest.raises(ConfigError, match="DEQ.F_SOLVER_MEMORY must be an int >= 0, got -1"):
        load_config(CLS_CFG, ["DEQ.F_SOLVER_MEMORY", "-1"])
    with pytest.raises(ConfigError, match=re.escape("DEQ.F_SOLVER_MEMORY must be 0 when DEQ.F_SOLVER is "
                                                    "'fixed_point' (not one of anderson, broyden), got 4")):
        tiny("DEQ.F_SOLVER", "fixed_point", "DEQ.F_SOLVER_MEMORY", "4")
    with pytest.raises(ConfigError, match=re.escape("DEQ.B_SOLVER_MEMORY must be 0 when DEQ.B_SOLVER is "
                                                    "'fixed_point'")):
        load_config(CLS_CFG, ["DEQ.B_SOLVER", "fixed_point", "DEQ.B_SOLVER_MEMORY", "2"])


def test_the_deq_transformer_keeps_the_originals_anderson_window_unless_told():
    cfg = load_config(LM_CFG, ["DEQ.F_SOLVER", "anderson"])
    assert build_model(cfg, "lm", n_token=5000).deq.f_solver_options == {"m": 6}
    cfg = load_config(LM_CFG, ["DEQ.F_SOLVER", "anderson", "DEQ.F_SOLVER_MEMORY", "3", "DEQ.B_SOLVER", "broyden",
                               "DEQ.B_SOLVER_MEMORY", "5"])
    model = build_model(cfg, "lm", n_token=5000)
    assert model.deq.f_solver_options == {"m": 3} and model.deq.b_solver_options == {"memory": 5}
