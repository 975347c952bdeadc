"""deqlab as a library: the public names, ``get_deq`` from arguments or a config, and the DEQ layer's own
pretraining and spectral-radius decisions, which both models now leave to it."""
import pytest
import torch

import deqlab
from deqlab import DEQ, get_deq
from deqlab.config import load_config
from deqlab.models import build_model

from conftest import REPO, TINY_OVERRIDES

B, D = 3, 6
PUBLIC = {"DEQ", "get_deq", "SOLVERS", "get_solver", "register_solver", "jacobian_frobenius_loss", "spectral_radius",
          "WeightNormConv2d", "WeightNormConv1d", "WeightNormLinear", "SpectralNormConv2d", "NormOptions",
          "VariationalDropout2d", "reset_per_forward", "DEQObjective", "fixed_point_correction", "__version__"}
LM_CFG = REPO / "experiments/austen/deq_transformer_quickstart.yaml"
CLS_CFG = REPO / "experiments/fashion_mnist/cls_mdeq_quickstart.yaml"


def options(deq: DEQ) -> dict:
    """Everything a DEQ layer was built with (its attributes but the module machinery)."""
    return {k: v for k, v in vars(deq).items() if not k.startswith("_") and k != "training"}


def toy(seed: int = 0):
    """A contractive cell z -> tanh(z W^T + x) (||W||_2 = 0.5) that counts its calls, and a zero z0."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D, D, generator=g, dtype=torch.float64)
    w = w * 0.5 / torch.linalg.matrix_norm(w, ord=2)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    calls = []

    def f(z):
        calls.append(1)
        return torch.tanh(z @ w.T + x)
    return f, torch.zeros(B, D, dtype=torch.float64), calls


def test_import_deqlab_exposes_the_public_names():
    from deqlab import layers, objective, regularizers, solvers

    assert set(deqlab.__all__) == PUBLIC and set(dir(deqlab)) >= PUBLIC
    assert deqlab.DEQ is deqlab.deq.DEQ and deqlab.spectral_radius is regularizers.spectral_radius
    assert deqlab.SOLVERS is solvers.SOLVERS and deqlab.NormOptions is layers.NormOptions
    assert deqlab.DEQObjective is objective.DEQObjective
    with pytest.raises(AttributeError, match="no attribute 'deq_layer'"):
        deqlab.deq_layer


def test_get_deq_from_arguments_or_a_config_gives_the_same_layer():
    overrides = ["DEQ.F_SOLVER", "anderson", "DEQ.B_SOLVER", "broyden", "DEQ.F_THRES", "17", "DEQ.B_THRES", "9",
                 "DEQ.F_EPS", "1e-9", "DEQ.B_EPS", "1e-8", "DEQ.STOP_MODE", "abs", "DEQ.F_SOLVER_MEMORY", "3",
                 "DEQ.SPECTRAL_RADIUS_MODE", "True", "TRAIN.PRETRAIN_STEPS", "4", "MODEL.NUM_LAYERS", "2"]
    cfg = load_config(None, overrides)
    by_cfg = get_deq(cfg)
    by_args = get_deq(f_solver="anderson", b_solver="broyden", f_max_iter=17, b_max_iter=9, f_tol=1e-9, b_tol=1e-8,
                      stop_mode="abs", f_solver_memory=3, spectral_radius=True, pretrain_steps=4, pretrain_depth=2)
    assert options(by_cfg) == options(by_args)
    assert by_cfg.f_solver_options == {"m": 3} and by_cfg.pretrain_steps == 4 and by_cfg.spectral_radius
    assert options(get_deq(cfg)) != options(get_deq())  # the config is not the defaults
    f, z0, _ = toy()
    by_cfg.eval(), by_args.eval()
    with torch.no_grad():
        (za, ia), (zb, ib) = by_cfg(f, z0), by_args(f, z0)
    assert torch.equal(za, zb) and ia["fwd"]["nstep"] == ib["fwd"]["nstep"] > 1
    assert get_deq(cfg, f_max_iter=3, grad="phantom").f_max_iter == 3  # arguments override the config


def test_the_pretraining_rule_of_both_originals():
    f, z0, calls = toy()
    mdeq = DEQ(pretrain_steps=3, pretrain_depth=5)  # MDEQ: NUM_LAYERS in any mode
    lm = DEQ(pretrain_steps=3, pretrain_depth=2, eval_pretrain_depth=4)  # DEQ-Transformer: n_layer, eval_n_layer
    for layer, train_depth, eval_depth in ((mdeq, 5, 5), (lm, 2, 4)):
        layer.train()
        assert [layer.unrolled_depth(s) for s in (-1, 0, 2, 3)] == [None, train_depth, train_depth, None]
        layer.eval()  # eval_n_layer at step 0 only: the original validates with the current step
        assert [layer.unrolled_depth(s) for s in (-1, 0, 1, 3)] == [None, eval_depth, train_depth, None]
    calls.clear()
    with torch.no_grad():
        _, info = lm(f, z0, train_step=0)
    assert len(calls) == 4 and info["fwd"] is None  # f applied eval_n_layer times, no solver
    always = DEQ(all_unrolled=True, pretrain_depth=2).eval()
    assert always.unrolled_depth(-1) == always.unrolled_depth(10**6) == 2


def test_the_jacobian_loss_while_unrolled_follows_each_original():
    f, z0, _ = toy()
    z0 = z0.requires_grad_()
    for pretrain_jac_loss in (True, False):  # MDEQ's original adds it while pretraining, the DEQ-Transformer's not
        layer = DEQ(pretrain_steps=2, pretrain_depth=3, pretrain_jac_loss=pretrain_jac_loss).train()
        _, unrolled = layer(f, z0, train_step=1, compute_jac_loss=True)
        _, solved = layer(f, z0, train_step=2, compute_jac_loss=True)
        assert (unrolled["jac_loss"] is not None) == pretrain_jac_loss and solved["jac_loss"] is not None


def test_the_layer_estimates_the_spectral_radius_in_eval_mode_when_built_to():
    f, z0, _ = toy()
    layer = DEQ(spectral_radius=True, pretrain_steps=2, f_tol=1e-10, f_max_iter=60)
    with torch.no_grad():
        assert layer.train()(f, z0)[1]["sradius"] is None  # a diagnostic of evaluation only
        sradius = layer.eval()(f, z0)[1]["sradius"]
        assert layer(f, z0, train_step=0)[1]["sradius"] is None  # unrolled: no equilibrium
        assert DEQ().eval()(f, z0)[1]["sradius"] is None
    assert sradius.shape == (B,) and (0 < sradius).all() and (sradius < 0.5 + 1e-6).all()


def test_both_models_build_their_layer_with_get_deq():
    cls_cfg = load_config(CLS_CFG, TINY_OVERRIDES + ["DEQ.SPECTRAL_RADIUS_MODE", "True"])
    model = build_model(cls_cfg, "cls")
    assert options(model.deq) == options(get_deq(cls_cfg)) and model.deq.pretrain_depth == 3
    lm_cfg = load_config(LM_CFG, ["DEQ.F_SOLVER", "anderson", "TRAIN.PRETRAIN_STEPS", "7"])
    from_config = build_model(lm_cfg, "lm", n_token=5000).deq  # above the config's adaptive cutoffs
    t, d = lm_cfg.MODEL.TRANSFORMER, lm_cfg.DEQ
    keywords = deqlab.models.deq_transformer.DEQTransformerLM(
        50, lm_cfg.MODEL.NUM_LAYERS, t.EVAL_N_LAYER, t.N_HEAD, t.D_MODEL, t.D_HEAD, t.D_INNER, 0.0, 0.0,
        pretrain_steps=7, f_solver="anderson", b_solver=d.B_SOLVER, f_thres=d.F_THRES, b_thres=d.B_THRES,
        f_eps=d.F_EPS, b_eps=d.B_EPS, stop_mode=d.STOP_MODE, grad=d.GRAD).deq
    assert options(from_config) == options(keywords)
    assert (keywords.f_solver_options, keywords.pretrain_jac_loss, keywords.eval_pretrain_depth) == \
        ({"m": 6}, False, t.EVAL_N_LAYER)
