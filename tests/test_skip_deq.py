"""Skip DEQ: a predicted initial state in the DEQ layer (skip loss, where its gradients go) and the Skip MDEQ
classifier and segmenter (MODEL.SKIP skip | skipreg): parameters, gradients, test-time use, checkpoints."""
import re

import pytest
import torch

from deqlab.checkpoint import load_weights, save_checkpoint
from deqlab.config import load_config
from deqlab.deq import DEQ
from deqlab.engine import Trainer
from deqlab.engine.optim import build_objective
from deqlab.errors import ConfigError
from deqlab.models import build_model

from conftest import REPO, SEG_TINY_OVERRIDES, TINY_OVERRIDES

B, D = 3, 8
CLS_CFG = REPO / "experiments/fashion_mnist/cls_mdeq_quickstart.yaml"
SEG_CFG = REPO / "experiments/cityscapes/seg_mdeq_SMALL.yaml"


def problem(seed=0):
    """z = tanh(W z + U x) (||W||_2 = 0.6: contractive) and a linear predictor z0 = x P."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D, D, generator=g, dtype=torch.float64)
    w = (w * 0.6 / torch.linalg.matrix_norm(w, ord=2)).requires_grad_()
    u = torch.randn(D, D, generator=g, dtype=torch.float64).requires_grad_()
    p = (0.1 * torch.randn(D, D, generator=g, dtype=torch.float64)).requires_grad_()
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    return w, u, p, x, (lambda z: torch.tanh(z @ w.T + x @ u.T))


def reference_fixed_point(w, u, x):
    with torch.no_grad():
        z = torch.zeros(B, D, dtype=torch.float64)
        for _ in range(500):
            z = torch.tanh(z @ w.T + x @ u.T)
    return z


def grads(loss, params):
    return [g if g is not None else torch.zeros_like(p)
            for p, g in zip(params, torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))]


@pytest.mark.parametrize("mode", ["ift", "phantom", "unrolled", "fixed_depth"])
def test_skip_loss_trains_only_the_predictor_and_the_task_loss_only_the_cell(mode):
    w, u, p, x, f = problem()
    deq = DEQ(f_solver="anderson", b_solver="anderson", f_max_iter=60, b_max_iter=60, f_tol=1e-12, b_tol=1e-12,
              stop_mode="abs", grad="unrolled" if mode == "fixed_depth" else mode)
    z0 = x @ p
    z, info = deq(f, z0, z0_predicted=True, fixed_depth=30 if mode == "fixed_depth" else None)
    z_star = reference_fixed_point(w, u, x)
    assert torch.allclose(z.detach(), z_star, atol=1e-6)
    # the loss is mean((z0 - z*)^2) with z* detached
    assert info["skip_loss"].item() == pytest.approx(float(((z0.detach() - z_star) ** 2).mean()), rel=1e-6)
    g_skip = grads(info["skip_loss"], [p, w, u])
    assert torch.allclose(g_skip[0], (2 * x.T @ (z0 - z_star) / z0.numel()).detach(), atol=1e-6)
    assert g_skip[1].abs().max() == 0 and g_skip[2].abs().max() == 0
    g_task = grads((z ** 2).sum(), [p, w, u])
    assert g_task[0].abs().max() == 0
    assert g_task[1].abs().max() > 0 and g_task[2].abs().max() > 0


def test_a_good_prediction_saves_steps_and_eval_has_no_skip_loss():
    w, u, p, x, f = problem(1)
    deq = DEQ(f_solver="anderson", f_max_iter=60, f_tol=1e-8, stop_mode="abs")
    z_star = reference_fixed_point(w, u, x)
    with torch.no_grad():
        _, cold = deq(f, torch.zeros(B, D, dtype=torch.float64), z0_predicted=True)
        z, warm = deq(f, z_star + 1e-6, z0_predicted=True)
    assert cold["skip_loss"] is None and warm["skip_loss"] is None
    assert 2 * warm["fwd"]["nstep"] < cold["fwd"]["nstep"]
    assert torch.allclose(z, z_star, atol=1e-7)
    # without z0_predicted nothing changes: no skip loss even when z0 has a graph
    _, info = deq(f, x @ p)
    assert info["skip_loss"] is None


def test_a_predicted_list_state_in_half_precision_is_solved_in_float32():
    torch.manual_seed(0)
    w = 0.3 * torch.randn(4, 4)
    f = lambda zs: [torch.tanh(zs[0] @ w + 1.0), torch.tanh(zs[1] + zs[0].sum(1, keepdim=True))]  # noqa: E731
    a = torch.zeros(2, 4, requires_grad=True)
    z0 = [(a + 0.5).half(), torch.zeros(2, 3, dtype=torch.half)]
    z, info = DEQ(f_solver="anderson", f_max_iter=30, grad="phantom")(f, z0, z0_predicted=True)
    assert [t.dtype for t in z] == [torch.float32] * 2 and [t.shape for t in z] == [(2, 4), (2, 3)]
    info["skip_loss"].backward()
    assert a.grad is not None and a.grad.abs().sum() > 0


def tiny_cls(*overrides):
    cfg = load_config(CLS_CFG, TINY_OVERRIDES + ["DEQ.GRAD", "ift", "LOSS.SKIP_WEIGHT", "0.5", *overrides])
    torch.manual_seed(0)
    return build_model(cfg, "cls"), cfg


def named_grads(model, loss):
    names, params = zip(*model.named_parameters())
    return dict(zip(names, grads(loss, list(params))))


@pytest.mark.parametrize("task", ["cls", "seg"])
def test_skip_mdeq_predictor_gets_gradients_only_from_the_skip_loss(task):
    if task == "cls":
        model, cfg = tiny_cls("MODEL.SKIP", "skip", "MODEL.SKIP_CHANNELS", "6")
        x, target = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
        task_loss = lambda out: torch.nn.functional.cross_entropy(out, target)  # noqa: E731
    else:
        cfg = load_config(SEG_CFG, SEG_TINY_OVERRIDES + ["MODEL.SKIP", "skip", "LOSS.SKIP_WEIGHT", "0.5"])
        torch.manual_seed(0)
        model = build_model(cfg, "seg")
        x = torch.randn(2, 3, 32, 64)
        task_loss = lambda out: out.square().mean()  # noqa: E731
    predictor = [n for n, _ in model.named_parameters() if n.startswith("skip_predictor.")]
    assert predictor and cfg.MODEL.SKIP == "skip"
    # the output GroupNorm starts at scale 0: a fresh predictor gives z0 = 0, as the plain MDEQ; move it off 0
    with torch.no_grad():
        for branch in model.skip_predictor.branches:
            assert branch[-1].weight.abs().max() == 0
            branch[-1].weight.normal_()
    model.train()
    out, info = model(x, train_step=10)
    aux = build_objective(cfg)(lambda o, _: task_loss(o), out, None, info, 10, 0).aux_loss
    assert aux.item() == pytest.approx(0.5 * info["skip_loss"].item())
    from_skip = named_grads(model, aux)
    from_task = named_grads(model, task_loss(out))
    for name in from_skip:
        if name in predictor:
            assert from_task[name].abs().max() == 0, name
        else:
            assert from_skip[name].abs().max() == 0, name
    assert all(from_skip[n].abs().max() > 0 for n in predictor if n.endswith("weight"))
    assert any(from_task[n].abs().max() > 0 for n in from_task if n.startswith("fullstage."))


def test_skipreg_adds_no_parameters_and_regularises_the_cell():
    plain, _ = tiny_cls()
    skipreg, _ = tiny_cls("MODEL.SKIP", "skipreg")
    assert [(n, p.shape) for n, p in plain.named_parameters()] == [(n, p.shape) for n, p in skipreg.named_parameters()]
    assert plain.state_dict().keys() == skipreg.state_dict().keys()
    skip, _ = tiny_cls("MODEL.SKIP", "skip")
    assert sum(p.numel() for p in skip.parameters()) > sum(p.numel() for p in plain.parameters())
    skipreg.train()
    x = torch.randn(4, 1, 28, 28)
    _, info = skipreg(x, train_step=10)
    g = named_grads(skipreg, info["skip_loss"])
    assert any(g[n].abs().max() > 0 for n in g if n.startswith("fullstage."))  # the cell predicts z0 = f(0; x)
    assert all(g[n].abs().max() == 0 for n in g if n.startswith(("classifier.", "final_layer.", "incre_modules.")))
    # one f evaluation makes z0: it is counted in the f evaluations, not as a step (Anderson: budget 3 = 3 evals)
    skipreg.eval()
    with torch.no_grad():
        _, info = skipreg(x, f_thres=3)
    assert info["fwd"]["nfe"] == 4 and info["fwd"]["nstep"] == 2
    assert info["skip_loss"] is None
    plain.eval()
    with torch.no_grad():
        _, info = plain(x, f_thres=3)
    assert info["fwd"]["nfe"] == 3 and info["fwd"]["nstep"] == 2 and info["skip_loss"] is None  # one f less


def test_the_predictor_gives_the_initial_state_at_test_time():
    model, _ = tiny_cls("MODEL.SKIP", "skip", "DEQ.F_EPS", "1e-9")
    model.eval()
    x = torch.randn(4, 1, 28, 28)
    seen = []
    model.deq.register_forward_pre_hook(lambda _m, args, kwargs: seen.append((args[1], kwargs)), with_kwargs=True)
    with torch.no_grad():
        for branch in model.skip_predictor.branches:
            branch[-1].weight.fill_(1.0)
        model(x)
        want = model.skip_predictor(model.cell_inputs(x)[0][0])
    (z0, kwargs), = seen
    assert kwargs["z0_predicted"] and all(torch.equal(a, b) for a, b in zip(z0, want))
    assert all(t.abs().max() > 0 for t in z0)


@pytest.mark.parametrize("skip", ["skip", "skipreg"])
def test_a_skip_mdeq_checkpoint_round_trips(skip, tmp_path):
    model, cfg = tiny_cls("MODEL.SKIP", skip)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.train()
    model(torch.randn(8, 1, 28, 28), train_step=10)  # moves the BatchNorm running statistics
    save_checkpoint(tmp_path / "skip.pth", {"model": model.state_dict()})
    torch.manual_seed(123)
    other = build_model(cfg, "cls")
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    load_weights(other, tmp_path / "skip.pth")
    x = torch.randn(4, 1, 28, 28)
    model.eval(), other.eval()
    with torch.no_grad():
        (a, ia), (b, ib) = model(x), other(x)
    assert torch.equal(a, b) and ia["fwd"]["nstep"] == ib["fwd"]["nstep"]
    plain, _ = tiny_cls()
    if skip == "skip":  # a Skip-MDEQ checkpoint does not load silently into a plain MDEQ
        with pytest.raises(Exception, match="skip_predictor"):
            load_weights(plain, tmp_path / "skip.pth")
    else:
        load_weights(plain, tmp_path / "skip.pth")


def test_the_trainer_adds_and_logs_the_weighted_skip_loss(tiny_run):
    path, overrides, tmp = tiny_run
    cfg = load_config(path, overrides + ["MODEL.SKIP", "skip", "LOSS.SKIP_WEIGHT", "2.0", "TRAIN.PRETRAIN_STEPS", "0"])
    trainer = Trainer(cfg, path)
    x, y = next(iter(trainer.train_loader))
    with torch.no_grad():
        for branch in trainer.model.skip_predictor.branches:
            branch[-1].weight.fill_(1.0)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if n.startswith("skip_predictor.")}
    stats = trainer.train_step(x, y)
    assert stats["aux_loss"] > 0 and stats["loss"] > 0
    after = dict(trainer.model.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in before)  # the skip loss reached every one


@pytest.mark.parametrize("override, message", [
    (["MODEL.SKIP", "skipp"], "MODEL.SKIP must be one of none, skip, skipreg, got 'skipp'; did you mean skip?"),
    (["MODEL.SKIP_CHANNELS", "-1"], "MODEL.SKIP_CHANNELS must be an int >= 0, got -1"),
    (["LOSS.SKIP_WEIGHT", "-0.1"], "LOSS.SKIP_WEIGHT must be a number >= 0, got -0.1"),
])
def test_skip_config_rules(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(CLS_CFG, override)
    cfg = load_config(CLS_CFG, ["MODEL.SKIP", "skipreg", "MODEL.SKIP_CHANNELS", "0", "LOSS.SKIP_WEIGHT", "0"])
    assert (cfg.MODEL.SKIP, cfg.MODEL.SKIP_CHANNELS, cfg.LOSS.SKIP_WEIGHT) == ("skipreg", 0, 0.0)
    defaults = load_config(None)
    assert (defaults.MODEL.SKIP, defaults.MODEL.SKIP_CHANNELS, defaults.LOSS.SKIP_WEIGHT) == ("none", 0, 0.01)


def test_the_skip_quickstart_variants_change_only_the_skip_keys():
    base = load_config(CLS_CFG)
    for name, skip in (("skip", "skip"), ("skipreg", "skipreg")):
        cfg = load_config(REPO / f"experiments/fashion_mnist/cls_mdeq_quickstart_{name}.yaml")
        assert cfg.MODEL.SKIP == skip
        for key in ("MODEL.SKIP", "MODEL.SKIP_CHANNELS", "LOSS.SKIP_WEIGHT"):
            section, leaf = key.split(".")
            cfg.defrost()
            cfg[section][leaf] = base[section][leaf]
        assert cfg == base
