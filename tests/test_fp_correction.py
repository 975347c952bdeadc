"""The fixed-point correction loss (torchdeq's fp_correction) and its use with the phantom gradient: the DEQ
layer's trajectory, the MDEQ classifier's and segmenter's outputs per iterate, the objective, the trainer."""
import re

import pytest
import torch
import torch.nn.functional as F

from deqlab.config import load_config
from deqlab.deq import DEQ
from deqlab.engine import Trainer
from deqlab.engine.optim import build_objective
from deqlab.errors import ConfigError
from deqlab.objective import fixed_point_correction, fpc_weights
from deqlab.models import build_model
from deqlab.tasks import get_task

from conftest import REPO, SEG_TINY_OVERRIDES, TINY_OVERRIDES

CLS_CFG = REPO / "experiments/fashion_mnist/cls_mdeq_quickstart.yaml"
FPC_CFG = REPO / "experiments/fashion_mnist/cls_mdeq_quickstart_phantom_fpc.yaml"
SEG_CFG = REPO / "experiments/cityscapes/seg_mdeq_SMALL.yaml"


def direct(losses, weights, gamma):
    """The torchdeq formulas written out, k = 0 .. n-1 (the last state is k = n - 1)."""
    n = len(losses)
    total = 0.0
    for k, loss in enumerate(losses):
        if weights == "exp":
            w = gamma ** (n - k - 1)
        elif weights == "linear":
            w = 1 - (n - k - 1) / n * gamma
        else:
            w = 1.0
        total = total + w * loss
    return total


@pytest.mark.parametrize("weights", ["const", "linear", "exp"])
@pytest.mark.parametrize("gamma", [0.8, 0.5])
@pytest.mark.parametrize("n", [1, 2, 5])
def test_correction_matches_the_direct_computation(weights, gamma, n):
    losses = [torch.tensor(float(3 * k + 1), requires_grad=True) for k in range(n)]
    got = fixed_point_correction(losses, weights, gamma)
    assert got.item() == pytest.approx(direct(losses, weights, gamma).item())
    got.backward()
    assert [loss.grad.item() for loss in losses] == pytest.approx(fpc_weights(n, weights, gamma))
    assert fpc_weights(n, weights, gamma)[-1] == pytest.approx(1.0)  # the last state weighs 1


def test_weights_by_hand_and_bad_input():
    assert fpc_weights(3, "exp", 0.8) == pytest.approx([0.64, 0.8, 1.0])
    assert fpc_weights(4, "linear", 0.8) == pytest.approx([0.4, 0.6, 0.8, 1.0])
    assert fpc_weights(3, "const", 0.8) == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="const, linear, exp"):
        fpc_weights(2, "cubic")
    with pytest.raises(ValueError, match="at least one"):
        fixed_point_correction([])


def cell():
    torch.manual_seed(0)
    w = 0.5 * torch.randn(6, 6) / 6 ** 0.5
    w.requires_grad_()
    x = torch.randn(2, 6)
    return w, (lambda z: torch.tanh(z @ w.T + x))


@pytest.mark.parametrize("every, steps", [(1, [1, 2, 3, 4, 5]), (2, [2, 4, 5]), (5, [5]), (7, [5])])
def test_the_phantom_trajectory_is_the_damped_iterates_with_graphs(every, steps):
    w, f = cell()
    deq = DEQ(f_solver="anderson", f_max_iter=40, f_tol=1e-6, grad="phantom", phantom_steps=5, phantom_tau=0.6)
    z, info = deq(f, torch.zeros(2, 6), trajectory_every=every)
    with torch.no_grad():
        z_star, _ = deq.f_solver(f, torch.zeros(2, 6), max_iter=40, tol=1e-6, stop_mode="rel")
    iterates, it = [], z_star
    for _ in range(5):
        it = 0.6 * f(it) + 0.4 * it
        iterates.append(it)
    traj = info["trajectory"]
    assert len(traj) == len(steps) and torch.equal(traj[-1], z)
    for t, k in zip(traj, steps):
        assert t.requires_grad and torch.allclose(t, iterates[k - 1], atol=1e-6)
    (g,) = torch.autograd.grad(traj[0].sum(), w)
    assert g.abs().max() > 0


def test_no_trajectory_unless_phantom_training_asks():
    w, f = cell()
    for grad in ("ift", "unrolled"):
        _, info = DEQ(f_solver="anderson", grad=grad)(f, torch.zeros(2, 6), trajectory_every=1)
        assert info["trajectory"] is None
    deq = DEQ(f_solver="anderson", grad="phantom")
    assert deq(f, torch.zeros(2, 6))[1]["trajectory"] is None
    with torch.no_grad():
        assert deq(f, torch.zeros(2, 6), trajectory_every=1)[1]["trajectory"] is None
    assert deq(f, torch.zeros(2, 6), trajectory_every=1, fixed_depth=3)[1]["trajectory"] is None


def test_fpc_classifier_returns_one_output_per_phantom_iterate_and_the_task_applies_the_correction():
    overrides = TINY_OVERRIDES + ["DEQ.GRAD", "phantom", "DEQ.PHANTOM_STEPS", "4", "LOSS.FPC_WEIGHTS", "linear",
                                  "LOSS.FPC_GAMMA", "0.5"]
    cfg = load_config(FPC_CFG, overrides)
    plain_cfg = load_config(CLS_CFG, overrides)
    assert cfg.LOSS.FPC and not plain_cfg.LOSS.FPC
    torch.manual_seed(0)
    model = build_model(cfg, "cls")
    torch.manual_seed(0)
    plain = build_model(plain_cfg, "cls")
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    model.train(), plain.train()
    last, info = model(x, train_step=10)
    out = info["trajectory_outputs"]
    ref, _ = plain(x, train_step=10)
    assert len(out) == 4 == len(info["trajectory"]) and out[-1] is last
    assert torch.allclose(out[-1], ref, atol=1e-6)  # the last output is the plain model's output
    assert not torch.allclose(out[0], out[-1])
    task = get_task("cls", cfg)
    want = direct([F.cross_entropy(o, y) for o in out], "linear", 0.5)
    objective = build_objective(cfg)
    assert objective(task.loss, last, y, info, 10, 0).loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert task.loss(out[-1], y).item() == pytest.approx(F.cross_entropy(ref, y).item(), rel=1e-5)
    assert task.train_stats(last.detach(), y) == task.train_stats(ref.detach(), y)
    model.eval()
    with torch.no_grad():
        out, info = model(x)
    assert info["trajectory"] is None and "trajectory_outputs" not in info  # evaluation: the equilibrium's output
    # unrolled pretraining: no phantom iterates, one output
    model.train()
    out, info = model(x, train_step=0)
    assert isinstance(out, torch.Tensor) and "trajectory_outputs" not in info


def test_fpc_segmenter_and_its_loss():
    cfg = load_config(SEG_CFG, SEG_TINY_OVERRIDES + ["DEQ.GRAD", "phantom", "DEQ.PHANTOM_STEPS", "3", "LOSS.FPC",
                                                     "True", "LOSS.FPC_GAP", "2"])
    torch.manual_seed(0)
    model = build_model(cfg, "seg")
    model.train()
    x = torch.randn(2, 3, 32, 64)
    y = torch.randint(0, cfg.DATASET.NUM_CLASSES, (2, 32, 64))
    last, info = model(x, train_step=10)
    out = info["trajectory_outputs"]
    assert len(out) == 2 and out[-1] is last  # iterates 2 and 3
    task = get_task("seg", cfg)
    want = direct([task.loss(o, y) for o in out], "exp", 0.8)
    assert build_objective(cfg)(task.loss, last, y, info, 10, 0).loss.item() == pytest.approx(want.item(), rel=1e-6)


def test_fpc_needs_the_phantom_gradient():
    with pytest.raises(ConfigError, match=re.escape(f"{FPC_CFG}, command line: LOSS.FPC must be False when DEQ.GRAD "
                                                    f"is 'ift' (not phantom), got True")):
        load_config(FPC_CFG, TINY_OVERRIDES + ["DEQ.GRAD", "ift"])


def test_the_trainer_steps_on_the_corrected_loss(tiny_run):
    path, overrides, tmp = tiny_run
    cfg = load_config(FPC_CFG, overrides + ["DEQ.GRAD", "phantom", "TRAIN.PRETRAIN_STEPS", "0"])
    trainer = Trainer(cfg, FPC_CFG)
    x, y = next(iter(trainer.train_loader))
    stats = trainer.train_step(x, y)
    assert stats["loss"] > 0 and 0 <= stats["acc"] <= 100


@pytest.mark.parametrize("override, message", [
    (["LOSS.FPC_WEIGHTS", "expo"], "LOSS.FPC_WEIGHTS must be one of const, linear, exp, got 'expo'; did you mean exp?"),
    (["LOSS.FPC_GAMMA", "1.5"], "LOSS.FPC_GAMMA must be a number in [0, 1], got 1.5"),
    (["LOSS.FPC_GAP", "0"], "LOSS.FPC_GAP must be an int >= 1, got 0"),
])
def test_fpc_config_rules(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(CLS_CFG, override)
    defaults = load_config(None)
    assert (defaults.LOSS.FPC, defaults.LOSS.FPC_WEIGHTS, defaults.LOSS.FPC_GAMMA, defaults.LOSS.FPC_GAP) == (
        False, "exp", 0.8, 1)


@pytest.mark.parametrize("name, f_thres, tau, branches, batch, epochs", [
    ("small", 22, 0.5, 2, 128, 50), ("large", 18, 0.7, 4, 64, 220)])
def test_the_phantom_recipes_carry_the_zoo_values(name, f_thres, tau, branches, batch, epochs):
    cfg = load_config(REPO / f"experiments/cifar/cls_mdeq_{name}_phantom.yaml")
    assert (cfg.DEQ.F_SOLVER, cfg.DEQ.F_THRES, cfg.DEQ.GRAD, cfg.DEQ.PHANTOM_STEPS, cfg.DEQ.PHANTOM_TAU) == (
        "broyden", f_thres, "phantom", 5, tau)
    assert (cfg.DEQ.STOP_MODE, cfg.DEQ.F_EPS, cfg.MODEL.WNORM, cfg.DATASET.AUGMENT) == ("abs", 1e-3, True, True)
    assert (cfg.TRAIN.OPTIMIZER, cfg.TRAIN.LR, cfg.TRAIN.WD, cfg.TRAIN.MOMENTUM, cfg.TRAIN.LR_MIN) == (
        "sgd", 0.1, 1e-4, 0.9, 1e-6)
    assert (cfg.LOSS.FPC, cfg.LOSS.FPC_WEIGHTS, cfg.LOSS.FPC_GAMMA) == (True, "exp", 0.8)
    assert (cfg.MODEL.EXTRA.FULL_STAGE.NUM_BRANCHES, cfg.TRAIN.BATCH_SIZE_PER_GPU, cfg.TRAIN.END_EPOCH) == (
        branches, batch, epochs)
