"""The training engine on a tiny Fashion-MNIST: resume, DDP equivalence, outputs, optimizer schedules."""
import math
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deqlab.checkpoint import load_checkpoint, save_checkpoint
from deqlab.config import load_config
from deqlab.engine import Trainer
from deqlab.engine.optim import build_optimizer, build_scheduler, observe_validation
from deqlab.utils.dist import DistInfo

from conftest import ddp_reference


def params_of(path):
    return load_checkpoint(path)["model"]


def test_resumed_run_ends_like_an_uninterrupted_one(tiny_run):
    path, overrides, tmp = tiny_run
    overrides = overrides + ["MODEL.DROPOUT", "0.2", "DATASET.AUGMENT", "True"]  # RNG state must be restored
    full_cfg = load_config(path, overrides + ["OUTPUT_DIR", str(tmp / "full")])
    full = Trainer(full_cfg, path)
    full_metrics = full.fit()

    cut_cfg = load_config(path, overrides + ["OUTPUT_DIR", str(tmp / "cut")])
    first = Trainer(cut_cfg, path)
    first.fit(stop_after=1)
    assert (first.out_dir / "checkpoint.pth").is_file() and not (first.out_dir / "final_state.pth").exists()
    state = load_checkpoint(first.out_dir / "checkpoint.pth")
    state["rng"] = state["rng"][0]  # as written before every rank's was kept: one process's state still resumes
    save_checkpoint(first.out_dir / "checkpoint.pth", state)
    resumed_cfg = load_config(path, overrides + ["OUTPUT_DIR", str(tmp / "cut"), "TRAIN.RESUME", "True"])
    resumed = Trainer(resumed_cfg, path)
    resumed_metrics = resumed.fit()

    assert resumed.epoch == full.epoch == 2 and resumed.step == full.step
    assert resumed_metrics == full_metrics
    a, b = params_of(full.out_dir / "final_state.pth"), params_of(resumed.out_dir / "final_state.pth")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_run_writes_loadable_outputs(tiny_run):
    path, overrides, _ = tiny_run
    trainer = Trainer(load_config(path, overrides), path)
    metrics = trainer.fit()
    out = trainer.out_dir
    assert {"config.yaml", "checkpoint.pth", "model_best.pth", "final_state.pth"} <= {p.name for p in out.iterdir()}
    state = load_checkpoint(out / "checkpoint.pth")  # weights_only=True
    assert state["epoch"] == 2 and state["step"] == 2 * 3 and isinstance(state["best_metric"], float)
    assert load_config(out / "config.yaml") == trainer.cfg
    assert metrics["count"] == 16 and metrics["fwd_steps"] > 0  # evaluated at equilibrium, on every image
    assert list(trainer.tb_dir.glob("events.out.tfevents.*"))


def _ddp_worker(rank, init_file, path, overrides, stop_after):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        cfg = load_config(path, overrides)
        Trainer(cfg, path, DistInfo(rank, 2, rank, torch.device("cpu"))).fit(stop_after)
    finally:
        dist.destroy_process_group()


def fit_on_two_processes(path, overrides, tmp_path, stop_after=None):
    """``Trainer.fit(stop_after)`` in two DDP processes (gloo, CPU)."""
    mp.spawn(_ddp_worker, args=(tempfile.mktemp(dir=tmp_path), path, overrides, stop_after), nprocs=2, join=True)


def test_two_process_ddp_matches_one_process_on_the_same_global_batches(tiny_run):
    path, overrides, tmp_path = tiny_run
    overrides = overrides + ["TRAIN.END_EPOCH", "1", "TRAIN.BATCH_SIZE_PER_GPU", "8"]
    fit_on_two_processes(path, overrides, tmp_path)
    cfg = load_config(path, overrides)
    ddp = params_of(tmp_path / "out/fashion_mnist/cls_mdeq_quickstart/final_state.pth")

    model, init = ddp_reference(cfg)
    for name, param in model.named_parameters():
        assert not torch.equal(param.detach(), init[name]) or param.grad is None, name
        assert torch.allclose(ddp[name], param.detach(), atol=1e-5, rtol=0), name
    # Only rank 0 wrote: one tensorboard event file.
    assert len(list((tmp_path / "log").rglob("events.out.tfevents.*"))) == 1


@pytest.mark.usefixtures("one_thread_per_process")
def test_two_process_ddp_resumes_every_ranks_random_state(tiny_run):
    """Dropout and augmentation draw different numbers on each rank: a two-process run cut after its first
    epoch and resumed ends exactly like the uninterrupted one only if every rank's random state was saved."""
    path, overrides, tmp = tiny_run
    overrides = overrides + ["MODEL.DROPOUT", "0.2", "DATASET.AUGMENT", "True", "TRAIN.BATCH_SIZE_PER_GPU", "8"]
    fit_on_two_processes(path, overrides + ["OUTPUT_DIR", str(tmp / "full")], tmp)
    cut = overrides + ["OUTPUT_DIR", str(tmp / "cut")]
    fit_on_two_processes(path, cut, tmp, stop_after=1)
    checkpoint = tmp / "cut/fashion_mnist/cls_mdeq_quickstart/checkpoint.pth"
    state = load_checkpoint(checkpoint)  # weights_only=True
    assert state["epoch"] == 1 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    # one process resuming it takes rank 0's state (the data are sharded otherwise: it cannot be exact anyway)
    Trainer(load_config(path, overrides + ["OUTPUT_DIR", str(tmp / "one"), "TRAIN.RESUME_FILE", str(checkpoint)]),
            path)
    assert torch.equal(torch.get_rng_state(), state["rng"][0]["torch"])
    fit_on_two_processes(path, cut + ["TRAIN.RESUME", "True"], tmp)
    a = params_of(tmp / "full/fashion_mnist/cls_mdeq_quickstart/final_state.pth")
    b = params_of(tmp / "cut/fashion_mnist/cls_mdeq_quickstart/final_state.pth")
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name, expected_at", [("cosine", {0: 1.0, 5: 0.5, 10: 0.0}),
                                               ("poly", {0: 1.0, 5: 0.5 ** 0.9, 10: 0.0}),
                                               ("step", {0: 1.0, 3: 0.1, 6: 0.01, 9: 0.01})])
def test_schedules_are_stepped_per_iteration(name, expected_at):
    cfg = load_config(None, ["TRAIN.LR_SCHEDULER", name, "TRAIN.END_EPOCH", "5", "TRAIN.LR_STEP", "[3, 6]",
                             "TRAIN.LR", "1.0", "TRAIN.OPTIMIZER", "sgd"])
    optimizer = build_optimizer(cfg, torch.nn.Linear(1, 1))
    scheduler = build_scheduler(cfg, optimizer, iters_per_epoch=1 if name == "step" else 2)
    seen = {}
    for it in range(11):
        seen[it] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    for it, lr in expected_at.items():
        assert math.isclose(seen[it], lr, abs_tol=1e-12), (it, seen[it])
    assert optimizer.param_groups[0]["nesterov"] is False and optimizer.param_groups[0]["momentum"] == 0.9


def lr_trace(overrides, steps, observe=()):
    cfg = load_config(None, ["TRAIN.LR", "1.0", "TRAIN.OPTIMIZER", "adam", *overrides])
    optimizer = build_optimizer(cfg, torch.nn.Linear(1, 1))
    scheduler = build_scheduler(cfg, optimizer, iters_per_epoch=1)
    seen = []
    for it in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        if it in observe:
            observe_validation(scheduler, observe[it])
    return seen, scheduler


def test_language_model_schedules():
    # locuslab/deq's inv_sqrt: step / W^1.5 while warming up, then 1/sqrt(step)
    seen, _ = lr_trace(["TRAIN.LR_SCHEDULER", "inv_sqrt", "TRAIN.WARMUP_STEPS", "4"], 10)
    assert seen[:3] == [0.0, 1 / 8, 2 / 8] and math.isclose(seen[9], 1 / 3)
    # linear warm-up, then cosine over MAX_STEP down to LR_MIN
    seen, _ = lr_trace(["TRAIN.LR_SCHEDULER", "cosine", "TRAIN.WARMUP_STEPS", "2", "TRAIN.MAX_STEP", "10",
                        "TRAIN.LR_MIN", "0.1"], 12)
    assert seen[:2] == [0.0, 0.5] and math.isclose(seen[5], 0.1 + 0.9 * 0.5) and math.isclose(seen[11], 0.1)
    # plateau (dev_perf): x LR_FACTOR once the loss failed to improve more than PATIENCE times; restored on resume
    seen, scheduler = lr_trace(["TRAIN.LR_SCHEDULER", "plateau", "TRAIN.PATIENCE", "1", "TRAIN.LR_FACTOR", "0.5"],
                               8, observe={0: 3.0, 1: 2.0, 2: 2.5, 3: 2.4, 4: 1.0})
    assert seen == [1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5]
    _, fresh = lr_trace(["TRAIN.LR_SCHEDULER", "plateau"], 1)
    fresh.load_state_dict(scheduler.state_dict())
    assert fresh.lr_lambdas[0].scale == 0.5 and fresh.lr_lambdas[0].best == 1.0
    assert isinstance(build_optimizer(load_config(None, ["TRAIN.OPTIMIZER", "RAdam"]), torch.nn.Linear(1, 1)),
                      torch.optim.RAdam)


def test_mid_epoch_validation_and_exact_resume(tiny_run):
    """EVAL_INTERVAL validates and checkpoints mid-epoch; a run resumed from such a checkpoint skips the batches
    already trained and ends like an uninterrupted one; MAX_STEP stops it."""
    path, overrides, tmp = tiny_run
    overrides = overrides + ["MODEL.DROPOUT", "0.2", "TRAIN.EVAL_INTERVAL", "2", "TRAIN.MAX_STEP", "5",
                             "TRAIN.END_EPOCH", "9", "TRAIN.PRECISE_BN_BATCHES", "0",
                             "TRAIN.LR_SCHEDULER", "constant"]  # so that the cut run's MAX_STEP 4 changes no LR
    full = Trainer(load_config(path, overrides + ["OUTPUT_DIR", str(tmp / "full")]), path)
    full_metrics = full.fit()
    assert full.step == 5 and full.epoch == 1 and full.batch_in_epoch == 2  # 3 batches per epoch
    cut = Trainer(load_config(path, overrides + ["OUTPUT_DIR", str(tmp / "cut"), "TRAIN.MAX_STEP", "4"]), path)
    cut.fit()
    state = load_checkpoint(cut.out_dir / "checkpoint.pth")
    assert (state["epoch"], state["batch_in_epoch"], state["step"]) == (1, 1, 4)  # saved mid-epoch 2
    resumed = Trainer(load_config(path, overrides + ["OUTPUT_DIR", str(tmp / "cut"), "TRAIN.RESUME", "True"]), path)
    assert resumed.fit() == full_metrics and resumed.step == 5
    a, b = params_of(full.out_dir / "final_state.pth"), params_of(resumed.out_dir / "final_state.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)
