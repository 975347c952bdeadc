"""The DEQ training objective (deqlab.objective): the Jacobian schedule, the Skip DEQ term, the fixed-point
correction over the per-iterate outputs, the config's objective, and what the trainer steps on and logs."""
import dataclasses

import pytest
import torch

from deqlab.config import load_config
from deqlab.engine import Trainer
from deqlab.engine.optim import build_objective
from deqlab.objective import DEQObjective

SCHEDULE = DEQObjective(jac_weight=0.4, jac_freq=1.0, jac_incremental=3, jac_stop_epoch=2, pretrain_steps=5,
                        pretrain_jac_weight=0.2, skip_weight=0.3)


def mse(output, target):
    return (output - target).square().mean()


@pytest.mark.parametrize("step, epoch, weight", [
    (0, 0, 0.2), (4, 0, 0.2),   # pretraining: its own weight, even past the stop epoch
    (4, 5, 0.2),
    (5, 0, 0.4), (7, 1, 0.4),   # the DEQ phase: 0.4 + 0.1 per 3 steps since step 5
    (8, 1, 0.5), (13, 1, 0.6),
    (11, 2, 0.0), (40, 3, 0.0),  # from epoch 2 on: none
])
def test_total_is_task_plus_scheduled_jacobian_plus_weighted_skip(step, epoch, weight):
    output, target = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0])  # mse 2.5
    jac, skip = torch.tensor(3.0), torch.tensor(0.5)
    terms = SCHEDULE(mse, output, target, {"jac_loss": jac, "skip_loss": skip}, step, epoch)
    assert SCHEDULE.jac_weight_at(step, epoch) == pytest.approx(weight)
    assert terms.loss.item() == pytest.approx(2.5)
    assert terms.jac_loss is jac  # logged unweighted, as the trainer always did
    assert terms.aux_loss.item() == pytest.approx(0.15)
    assert terms.total.item() == pytest.approx(2.5 + weight * 3.0 + 0.15)


def test_absent_terms_are_none_and_add_nothing():
    output = torch.tensor([1.0, 3.0], requires_grad=True)
    terms = SCHEDULE(mse, output, torch.zeros(2), {"jac_loss": None, "skip_loss": None}, 6, 0)
    assert terms.jac_loss is None and terms.aux_loss is None and terms.total is terms.loss
    assert terms.total.item() == pytest.approx(5.0)
    terms = SCHEDULE(mse, output, torch.zeros(2), {}, 6, 0)  # a model whose info has no DEQ terms at all
    assert terms.total.item() == pytest.approx(5.0)


@pytest.mark.parametrize("weights, gamma, expect", [
    ("exp", 0.5, [0.25, 0.5, 1.0]), ("linear", 0.6, [0.6, 0.8, 1.0]), ("const", 0.5, [1.0, 1.0, 1.0])])
def test_fpc_is_the_weighted_sum_of_the_iterates_task_losses(weights, gamma, expect):
    objective = DEQObjective(fpc_weights=weights, fpc_gamma=gamma, skip_weight=0.0)
    outputs = [torch.tensor([float(k)], requires_grad=True) for k in (3, 2, 1)]  # mse against 0: 9, 4, 1
    info = {"trajectory_outputs": outputs, "jac_loss": None, "skip_loss": None}
    terms = objective(mse, outputs[-1], torch.zeros(1), info, 10, 0)
    assert terms.loss.item() == pytest.approx(expect[0] * 9 + expect[1] * 4 + expect[2] * 1)
    terms.total.backward()  # d/d o_k of w_k · o_k² = 2 w_k o_k: every iterate gets its weighted gradient
    assert [o.grad.item() for o in outputs] == pytest.approx([2 * w * o.item() for w, o in zip(expect, outputs)])


def test_the_jacobian_draw_uses_the_generator_only_when_the_weight_is_positive():
    state = torch.get_rng_state()
    assert not SCHEDULE.draw_jac(20, 2)  # weight 0 from epoch 2: no draw
    assert torch.equal(torch.get_rng_state(), state)
    assert SCHEDULE.draw_jac(6, 0)  # jac_freq 1: always
    assert not torch.equal(torch.get_rng_state(), state)
    assert not dataclasses.replace(SCHEDULE, jac_freq=0.0).draw_jac(6, 0)


def test_the_config_objective_and_bad_arguments():
    assert build_objective(load_config(None)) == DEQObjective()  # the plain defaults are the config's
    cfg = load_config(None, ["LOSS.JAC_LOSS_WEIGHT", "0.7", "LOSS.JAC_INCREMENTAL", "50", "LOSS.JAC_STOP_EPOCH", "9",
                             "LOSS.PRETRAIN_JAC_LOSS_WEIGHT", "0.1", "LOSS.JAC_LOSS_FREQ", "0.3",
                             "TRAIN.PRETRAIN_STEPS", "4", "LOSS.SKIP_WEIGHT", "2.0", "LOSS.FPC_WEIGHTS", "linear",
                             "LOSS.FPC_GAMMA", "0.5"])
    assert build_objective(cfg) == DEQObjective(jac_weight=0.7, jac_freq=0.3, jac_incremental=50, jac_stop_epoch=9,
                                                pretrain_steps=4, pretrain_jac_weight=0.1, skip_weight=2.0,
                                                fpc_weights="linear", fpc_gamma=0.5)
    with pytest.raises(ValueError, match="const, linear, exp"):
        DEQObjective(fpc_weights="cubic")
    with pytest.raises(ValueError, match="jac_incremental"):
        DEQObjective(jac_incremental=0)


class Recording(DEQObjective):
    """The config's objective, keeping each step's info and terms for the test to compare."""

    seen: list = []

    def __call__(self, criterion, output, target, info, step, epoch):
        terms = super().__call__(criterion, output, target, info, step, epoch)
        self.seen.append((dict(info), terms))
        return terms


def test_the_trainer_steps_on_and_logs_the_objective(tiny_run):
    path, overrides, tmp = tiny_run
    cfg = load_config(path, overrides + ["MODEL.SKIP", "skip", "LOSS.SKIP_WEIGHT", "2.0", "TRAIN.PRETRAIN_STEPS", "0",
                                         "LOSS.JAC_LOSS_WEIGHT", "0.5", "LOSS.JAC_LOSS_FREQ", "1.0"])
    trainer = Trainer(cfg, path)
    trainer.objective = Recording(**dataclasses.asdict(trainer.objective))
    Recording.seen.clear()
    x, y = next(iter(trainer.train_loader))
    stats = trainer.train_step(x, y)
    (info, terms), = Recording.seen
    assert stats["loss"] == pytest.approx(terms.loss.item()) and stats["loss"] > 0
    assert stats["jac_loss"] == pytest.approx(info["jac_loss"].item()) and stats["jac_loss"] > 0
    assert stats["aux_loss"] == pytest.approx(2.0 * info["skip_loss"].item()) and stats["aux_loss"] > 0
    assert terms.total.item() == pytest.approx(stats["loss"] + 0.5 * stats["jac_loss"] + stats["aux_loss"], rel=1e-5)
