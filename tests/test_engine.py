"""The training engine on a tiny Fashion-MNIST: resume, DDP equivalence, outputs, optimizer schedules."""
import math
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deqlab.checkpoint import load_checkpoint
from deqlab.config import load_config
from deqlab.engine import Trainer
from deqlab.engine.optim import build_optimizer, build_scheduler
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


def _ddp_worker(rank, init_file, path, overrides):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        cfg = load_config(path, overrides)
        Trainer(cfg, path, DistInfo(rank, 2, rank, torch.device("cpu"))).fit()
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_matches_one_process_on_the_same_global_batches(tiny_run):
    path, overrides, tmp_path = tiny_run
    overrides = overrides + ["TRAIN.END_EPOCH", "1", "TRAIN.BATCH_SIZE_PER_GPU", "8"]
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_ddp_worker, args=(init_file, path, overrides), nprocs=2, join=True)
    cfg = load_config(path, overrides)
    ddp = params_of(tmp_path / "out/fashion_mnist/cls_mdeq_quickstart/final_state.pth")

    model, init = ddp_reference(cfg)
    for name, param in model.named_parameters():
        assert not torch.equal(param.detach(), init[name]) or param.grad is None, name
        assert torch.allclose(ddp[name], param.detach(), atol=1e-5, rtol=0), name
    # Only rank 0 wrote: one tensorboard event file.
    assert len(list((tmp_path / "log").rglob("events.out.tfevents.*"))) == 1


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
