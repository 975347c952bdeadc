"""benchmarks/compare_original.py --task seg|lm without the originals (CI has no checkouts of them): our side's
models and budgets, the equal-weights gate, the checkouts the CLI asks for, the originals' adapters' helpers."""
import sys

import numpy as np
import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import compare_original  # noqa: E402
import compare_tasks  # noqa: E402
import originals  # noqa: E402
from deqlab.models import DEQTransformerLM  # noqa: E402
from deqlab.solvers import max_evals  # noqa: E402

SHAPE = {"crop": [128, 64], "tgt_len": 16}


@pytest.mark.parametrize("task", ["seg", "lm"])
@pytest.mark.parametrize("variant", ["ours", "floor"])
def test_a_train_step_spends_the_originals_evaluations(task, variant):
    """At threshold t ours spends what the original spends: seg Broyden t + 1 both ways, lm Anderson t forward
    and Broyden t + 1 backward; the floor (fixed-point iteration) the same counts."""
    t = 3
    built = compare_tasks.build_ours(task, t, variant, SHAPE, batch=1)
    built.model.train()
    built.loss(compare_tasks.TRAIN_STEP).backward()
    forward, backward = compare_tasks.SOLVERS[task]
    assert built.evals() == (max_evals(forward, t), max_evals(backward, t)) == ((t + 1 if task == "seg" else t), t + 1)
    assert all(p.grad is not None for p in built.model.parameters() if p.requires_grad)


def test_the_originals_lm_arguments_build_our_models_layout():
    """The keyword arguments handed to locuslab/deq's constructor build (in our class, which takes the same ones)
    exactly the state-dict layout of our config's model: the same weights load on both sides."""
    cfg = compare_tasks.ours_config("lm", 5, "ours", SHAPE)
    ours = compare_tasks.build_ours("lm", 5, "ours", SHAPE, batch=1).model
    from_kwargs = DEQTransformerLM(**compare_tasks.lm_kwargs(cfg))
    assert [(k, v.shape) for k, v in from_kwargs.state_dict().items()] == \
        [(k, v.shape) for k, v in ours.state_dict().items()]
    assert compare_tasks.lm_kwargs(cfg)["pretrain_steps"] == 1  # train_step 0 is the unrolled check's path


def test_the_batch_is_the_same_in_every_process():
    cfg = compare_tasks.ours_config("seg", 5, "ours", SHAPE)
    (x1, y1), (x2, y2) = compare_tasks.make_batch("seg", cfg, 2), compare_tasks.make_batch("seg", cfg, 2)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and x1.shape == (2, 3, 64, 128)
    assert (y1[:, :, :16] == 255).all() and (y1[:, :, 16:] < 19).all()


def fake_child(check: dict, timed: list[str], converged_grad: float = 1e-10):
    def run(which: str, f_thres: int) -> dict:
        if which == "check":
            return check
        if which == "converged":
            return {"ours": 3.0, "original": 3.0, "loss": 0.0, "grad": converged_grad,
                    "residuals": {"ours_fwd": 1e-11, "original_fwd": 1e-11}}
        timed.append(which)
        return {"train_s": {"original": 2.0}.get(which, 1.0), "warmup_s": 0.0, "loss": 3.0, "evals": [11, 11],
                "params": 10}
    return run


def checked(unrolled_loss: float = 0.0, deq_loss: float = 0.0) -> dict:
    return {"unrolled": {"ours": 3.0, "original": 3.0, "loss": unrolled_loss, "grad": 1e-6},
            "deq": {"ours": 3.0, "original": 3.0, "loss": deq_loss, "grad": 0.5}}


@pytest.mark.parametrize("differences", [{"unrolled_loss": 1e-3}, {"deq_loss": 2e-3}])
def test_unequal_losses_stop_the_comparison_before_any_timing(differences):
    args = compare_original.argparse.Namespace(task="seg", f_thres=[10], batch=2, variants=["ours"])
    timed = []
    with pytest.raises(SystemExit, match="do not compute the same thing; nothing timed"):
        compare_tasks.compare(args, fake_child(checked(**differences), timed))
    assert timed == []


def test_equal_losses_time_the_original_then_each_variant():
    args = compare_original.argparse.Namespace(task="lm", f_thres=[10], batch=8, variants=["ours", "floor"])
    timed = []
    rows = compare_tasks.compare(args, fake_child(checked(deq_loss=5e-5), timed))
    assert timed == ["original", "ours", "floor"]
    assert [(r["variant"], r["train_ratio"]) for r in rows] == [("original", 1.0), ("ours", 0.5), ("floor", 0.5)]


def test_unequal_converged_gradients_stop_the_lm_comparison_before_any_timing():
    args = compare_original.argparse.Namespace(task="lm", f_thres=[10], batch=8, variants=["ours"])
    timed = []
    with pytest.raises(SystemExit, match="converged DEQ-path cell gradients differ by 1.0e-03"):
        compare_tasks.compare(args, fake_child(checked(), timed, converged_grad=1e-3))
    assert timed == []


def test_the_converged_check_configures_our_side_to_converge():
    """Broyden forward and both tolerances at ``CONVERGED["eps"]``, after the base overrides' zeros."""
    eps = compare_tasks.CONVERGED["eps"]
    cfg = compare_tasks.ours_config("lm", 5, "ours", SHAPE,
                                    ["DEQ.F_SOLVER", "broyden", "DEQ.F_EPS", str(eps), "DEQ.B_EPS", str(eps)])
    assert (cfg.DEQ.F_SOLVER, cfg.DEQ.F_EPS, cfg.DEQ.B_EPS) == ("broyden", eps, eps)


@pytest.mark.parametrize("argv, message", [
    (["--task", "seg"], "--task seg needs --mdeq, a checkout of github.com/locuslab/mdeq"),
    (["--task", "lm", "--mdeq", "."], "--task lm needs --deq, a checkout of github.com/locuslab/deq"),
    (["--task", "lm", "--deq", "{tmp}"], "--deq {tmp} is not a checkout of github.com/locuslab/deq "
                                         "(no DEQ-Sequence/models/deq_transformer.py)"),
    (["--task", "cls", "--mdeq", "{tmp}"], "--mdeq {tmp} is not a checkout of github.com/locuslab/mdeq"),
])
def test_the_cli_refuses_a_missing_or_wrong_checkout(argv, message, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as exit_:
        compare_original.main(argv)
    assert message.replace("{tmp}", str(tmp_path)) in str(exit_.value)


def test_the_cli_refuses_another_tasks_variant(tmp_path):
    (tmp_path / "DEQ-Sequence/models").mkdir(parents=True)
    (tmp_path / "DEQ-Sequence/models/deq_transformer.py").touch()
    with pytest.raises(SystemExit, match="--task lm has no variant ours_nhwc; known: ours, floor"):
        compare_original.main(["--task", "lm", "--deq", str(tmp_path), "--variants", "ours_nhwc"])


def test_counting_a_solvers_evaluations_per_direction():
    counts = {"fwd": 0, "bwd": 0}

    def solver(f, x0, threshold, name="forward"):
        for _ in range(threshold + 1):
            x0 = f(x0)
        return x0

    counted = originals.counting(solver, counts, lambda kw: "fwd" if kw.get("name") == "forward" else "bwd")
    assert counted(lambda z: z / 2, 8.0, 3, name="forward") == 0.5
    counted(lambda z: z, 1.0, 5, name="backward")
    assert counts == {"fwd": 4, "bwd": 6}


def test_loading_our_weights_into_an_original_allows_only_its_aliases():
    model = torch.nn.ModuleDict({"fullstage": torch.nn.Linear(2, 2), "fullstage_copy": torch.nn.Linear(2, 2)})
    ours = {k: v for k, v in torch.nn.ModuleDict({"fullstage": torch.nn.Linear(2, 2)}).state_dict().items()}
    originals.load_plain(model, ours)
    assert torch.equal(model["fullstage"].weight, ours["fullstage.weight"])
    with pytest.raises(RuntimeError, match="unexpected"):
        originals.load_plain(model, {**ours, "head.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="missing"):
        originals.load_plain(torch.nn.ModuleDict({"head": torch.nn.Linear(2, 2), **model}), ours)


def test_runtime_patches_give_the_originals_what_they_call():
    originals.patch_runtime()
    assert np.int(3.7) == 3
    a, b = torch.tensor([[2.0, 0.0], [0.0, 4.0]]), torch.tensor([[2.0], [8.0]])
    assert torch.equal(torch.solve(b, a)[0], torch.tensor([[1.0], [2.0]]))  # the old argument order (b, A)
