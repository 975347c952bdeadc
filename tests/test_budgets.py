"""A solver budget means the original solver's budget, and the stats count steps and f evaluations apart.

Broyden (locuslab/mdeq, locuslab/deq, torchdeq): ``max_iter`` t is f(z0) then t steps, t + 1 evaluations.
Anderson (locuslab/deq's ``threshold``): t evaluations. Fixed-point iteration (torchdeq's ``max_iter``):
t evaluations, returning the image of the best iterate.
"""
import pytest
import torch

from deqlab.checkpoint import load_weights
from deqlab.config import load_config
from deqlab.engine import Trainer
from deqlab.engine.evaluator import evaluate
from deqlab.engine.launch import results_row
from deqlab.models import build_model
from deqlab.solvers import budget_for_evals, get_solver, max_evals

from conftest import COMPAT, needs_compat

D = 6
A = 0.6  # f(z) = A z + c: a contraction whose fixed point is c / (1 − A)


class Counted:
    """A real f that counts its calls."""

    def __init__(self, f):
        self.f, self.calls = f, 0

    def __call__(self, z):
        self.calls += 1
        return self.f(z)


def affine_problem():
    c = torch.linspace(-1.0, 2.0, 2 * D, dtype=torch.float64).reshape(2, D)
    return Counted(lambda z: A * z + c), c / (1 - A)


def solve(name, max_iter, tol=0.0, **opts):
    f, z_star = affine_problem()
    z, stats = get_solver(name)(f, torch.zeros_like(z_star), max_iter=max_iter, tol=tol, stop_mode="abs", **opts)
    return z, stats, f.calls, z_star


@pytest.mark.parametrize("t", [1, 2, 3, 7])
def test_broyden_budget_is_steps_after_f_of_z0(t):
    z, stats, calls, _ = solve("broyden", t)
    assert calls == stats["nfe"] == t + 1 and stats["nstep"] == t
    assert stats["abs_trace"].shape == (t + 1,)  # one residual per evaluation


def test_broyden_budget_one_is_one_step_and_two_solve_an_affine_map():
    """On f(z) = A z + c every residual is parallel to c: the first step is z1 = f(z0) = c, and after one
    secant update the second lands on z* exactly."""
    f, _ = affine_problem()
    z, stats, calls, z_star = solve("broyden", 1)
    assert calls == 2 and torch.equal(z, f.f(torch.zeros_like(z)))
    z, stats, calls, z_star = solve("broyden", 2)
    assert calls == 3 and torch.allclose(z, z_star, atol=1e-12, rtol=0)


@pytest.mark.parametrize("t", [1, 2, 3, 7])
def test_anderson_budget_is_f_evaluations(t):
    z, stats, calls, _ = solve("anderson", t)
    assert calls == stats["nfe"] == t and stats["nstep"] == t - 1
    assert stats["abs_trace"].shape == (t,)


def test_anderson_evaluates_x0_then_f_of_x0_then_mixes():
    """As locuslab/deq's anderson: x0, x1 = f(x0), x2 mixed from both. Two residuals of an affine map with
    Jacobian A·I are parallel, so the third evaluation is at z* (up to the tiny regulariser)."""
    f, z_star = affine_problem()
    z, stats, calls, _ = solve("anderson", 1)
    assert calls == 1 and torch.equal(z, torch.zeros_like(z_star))  # the only iterate measured
    z, stats, calls, _ = solve("anderson", 2)
    assert calls == 2 and torch.equal(z, f.f(torch.zeros_like(z_star)))
    z, stats, calls, _ = solve("anderson", 3, lam=0.0)
    assert calls == 3 and torch.allclose(z, z_star, atol=1e-9, rtol=0)


@pytest.mark.parametrize("t", [1, 2, 5])
def test_fixed_point_budget_is_f_evaluations_and_returns_the_image(t):
    """torchdeq's fixed_point_iter: t evaluations, the answer f(z_{t-1}) = z_t = f^t(z0), each a step."""
    f, _ = affine_problem()
    z, stats, calls, _ = solve("fixed_point", t)
    want = torch.zeros(2, D, dtype=torch.float64)
    for _ in range(t):
        want = f.f(want)
    assert calls == stats["nfe"] == stats["nstep"] == t
    assert torch.equal(z, want)


def test_damped_fixed_point_returns_the_damped_image():
    f, _ = affine_problem()
    z, stats, calls, _ = solve("fixed_point", 3, tau=0.5)
    want = torch.zeros(2, D, dtype=torch.float64)
    for _ in range(3):
        want = 0.5 * f.f(want) + 0.5 * want
    assert calls == 3 and torch.allclose(z, want, atol=1e-15, rtol=0)


@pytest.mark.parametrize("name,extra", [("broyden", 1), ("anderson", 0), ("fixed_point", 0)])
def test_an_early_stop_counts_every_evaluation(name, extra):
    z, stats, calls, z_star = solve(name, 200, tol=1e-10)
    assert stats["converged"] and calls == stats["nfe"] < 200
    assert stats["nstep"] == stats["nfe"] - 1 + (name == "fixed_point")
    assert torch.allclose(z, z_star, atol=1e-9, rtol=0)


def tanh_problem(scale=0.95):
    """z = tanh(W z + x): float64, B = 3, D = 40, ||W||₂ = ``scale`` (slow enough that budgets bind)."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(40, 40, generator=g, dtype=torch.float64)
    w = w * scale / torch.linalg.matrix_norm(w, ord=2)
    x = torch.randn(3, 40, generator=g, dtype=torch.float64)
    return lambda z: torch.tanh(z @ w.T + x)


@pytest.mark.parametrize("t,tol", [(26, 1e-3), (26, 0.0), (5, 0.0)])
def test_fixed_point_gives_torchdeqs_numbers(t, tol):
    """torchdeq's fixed_point_iter with the ImageNet zoo recipe's settings (26, absolute 1e-3) and with the whole
    budget spent: the same answer and the same f evaluations."""
    torchdeq_fp = pytest.importorskip("torchdeq.solver.fp_iter")
    f = tanh_problem()
    ours, theirs = Counted(f), Counted(f)
    z0 = torch.zeros(3, 40, dtype=torch.float64)
    z, stats = get_solver("fixed_point")(ours, z0, max_iter=t, tol=tol, stop_mode="abs")
    want = torchdeq_fp.fixed_point_iter(theirs, z0, max_iter=t, tol=tol, stop_mode="abs")[0]
    assert ours.calls == theirs.calls == stats["nfe"] and torch.equal(z, want)


@pytest.mark.parametrize("t", [1, 3, 10])
def test_broyden_and_anderson_spend_torchdeqs_evaluations(t):
    """The same f evaluations as torchdeq's solvers at the same max_iter (Anderson: from 3, torchdeq evaluates
    x0 and f(x0) whatever the budget); Broyden, the same method, gives the same answer."""
    solver = pytest.importorskip("torchdeq.solver")
    f = tanh_problem()
    z0 = torch.zeros(3, 40, dtype=torch.float64)
    ours, theirs = Counted(f), Counted(f)
    z, _ = get_solver("broyden")(ours, z0, max_iter=t, tol=0.0, stop_mode="abs")
    want = solver.get_solver("broyden")(theirs, z0, max_iter=t, tol=0.0, stop_mode="abs")[0]
    assert ours.calls == theirs.calls == t + 1
    assert torch.allclose(z, want, atol=1e-10, rtol=0)
    if t >= 3:
        ours, theirs = Counted(f), Counted(f)
        get_solver("anderson")(ours, z0, max_iter=t, tol=0.0, stop_mode="abs")
        solver.get_solver("anderson")(theirs, z0, max_iter=t, tol=0.0, stop_mode="abs")
        assert ours.calls == theirs.calls == t


@pytest.mark.parametrize("name", ["broyden", "anderson", "fixed_point"])
def test_budget_for_evals_buys_exactly_that_many_evaluations(name):
    for evals in (2, 5):
        t = budget_for_evals(name, evals)
        _, stats, calls, _ = solve(name, t)
        assert calls == evals == max_evals(name, t)


def test_training_and_evaluation_report_steps_and_f_evaluations_apart(tiny_run):
    """Broyden forward F_THRES 3 and backward B_THRES 4, tolerances 0: 3 steps / 4 evaluations forward, 4 steps /
    5 evaluations / 4 VJPs backward (the evaluation at g = 0 needs none), in the trainer's stats (progress bar,
    tensorboard), the evaluation metrics and the CSV row."""
    path, overrides, _ = tiny_run
    cfg = load_config(path, overrides + ["DEQ.F_SOLVER", "broyden", "DEQ.B_SOLVER", "broyden", "DEQ.F_THRES", "3",
                                         "DEQ.B_THRES", "4", "DEQ.F_EPS", "0", "DEQ.B_EPS", "0",
                                         "TRAIN.PRETRAIN_STEPS", "0", "DEQ.RAND_F_THRES_DELTA", "0"])
    trainer = Trainer(cfg, path)
    trainer.net.train()
    x, y = next(iter(trainer.train_loader))
    stats = trainer.train_step(x, y)
    assert (stats["fwd_steps"], stats["fwd_nfe"]) == (3, 4)
    assert (stats["bwd_steps"], stats["bwd_nfe"], stats["bwd_vjps"]) == (4, 5, 4)
    metrics = evaluate(trainer.task, trainer.net, trainer.test_loader, trainer.device, f_thres=2)
    assert (metrics["fwd_steps"], metrics["fwd_nfe"]) == (2, 3)
    row = results_row(str(path), trainer.task, "test", 2, metrics["top1"], metrics)
    assert (row["f_thres"], row["fwd_steps"], row["fwd_nfe"]) == (2, 2, 3)


@needs_compat
@pytest.mark.filterwarnings("ignore:.*ignoring DEBUG.DEBUG")
def test_mini4_classifier_matches_the_original_at_every_broyden_budget():
    """locuslab/mdeq's MINI4 classifier at MODEL.F_THRES t (float64, tolerance 0: every budget spent): the
    same logits and the same number of f evaluations, t + 1."""
    ref = torch.load(COMPAT / "budgets/mini4_broyden_budgets.pt", weights_only=True)
    x = torch.load(COMPAT / "cls_mini4_conditioned_reference_outputs.pt", weights_only=True)["input"].double()
    cfg = load_config(COMPAT / "configs/v1_cls_mdeq_MINI4.yaml", ["DEQ.F_SOLVER", "broyden", "DEQ.F_EPS", 0.0])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    load_weights(model, COMPAT / "cls_mini4_conditioned.pkl")
    model.double()
    assert ref["budgets"] == [1, 2, 3, 5, 8]
    for t in ref["budgets"]:
        calls = []
        handle = model.fullstage.register_forward_hook(lambda *_: calls.append(1))
        try:
            with torch.no_grad():
                logits, info = model(x, f_thres=t)
        finally:
            handle.remove()
        want = ref[f"logits_f_thres_{t}"]
        rel = float(torch.linalg.norm(logits - want) / torch.linalg.norm(want))
        assert rel < 1e-6, (t, rel)
        assert len(calls) == info["fwd"]["nfe"] == int(ref[f"f_evals_f_thres_{t}"]) == t + 1
        assert info["fwd"]["nstep"] == t
