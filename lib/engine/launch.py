"""The bodies of the train and test tools, written once for every task (``tools/*_train.py`` are thin)."""
from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from deqlab.engine.cli import parse_config, tool_parser
from deqlab.engine.evaluator import eval_f_thres, evaluate
from deqlab.engine.logs import setup_logging
from deqlab.engine.trainer import Trainer
from deqlab.errors import ConfigError
from deqlab.tasks import Task, get_task
from deqlab.utils.dist import DistInfo, cleanup, init_distributed

log = logging.getLogger("deqlab")


def train_main(task: str, description: str, argv: list[str] | None = None) -> None:
    """``--cfg FILE [--seed N] [KEY VALUE ...]``: train ``task`` on one process or under torchrun."""
    args, cfg = parse_config(tool_parser(description), argv)
    dist_info = init_distributed(cfg.DEVICE, cfg.CPU_ALLOCATOR)
    setup_logging(dist_info.is_main, hold_for_log_file=True)  # train.log is written once the run has trained
    try:
        trainer = Trainer(cfg, args.cfg, dist_info, task=task, keyed_by_seed=args.seed_explicit)
        trainer.fit()
        trainer.final_test()
    finally:
        cleanup()


def append_results_row(path: str | Path, row: dict[str, Any]) -> None:
    """Append ``row`` to the CSV at ``path`` (header written once; an existing file keeps its columns)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(row)
    if path.is_file() and path.stat().st_size:
        with path.open(newline="") as fh:
            fields = next(csv.reader(fh), fields)
    new = not path.is_file() or not path.stat().st_size
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


BatchHook = Callable[[argparse.Namespace, Any, Any], Callable[[int, torch.Tensor], None] | None]


def test_main(task: str, description: str, argv: list[str] | None = None,
              add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
              batch_hook: BatchHook | None = None) -> dict[str, Any]:
    """Evaluate ``TEST.MODEL_FILE`` with the task's full test-time procedure; ``--results_name FILE.csv``
    appends one row (config, checkpoint, seed, solver budget, metrics), e.g. for a test-time F_THRES sweep.
    ``batch_hook(args, cfg, loader)`` may return a per-batch callback (e.g. to save predictions)."""
    parser = tool_parser(description)
    parser.add_argument("--results_name", "--results_file", dest="results_name", default="",
                        help="CSV file to append this evaluation's row to")
    parser.add_argument("--use_loss_as_perf", action="store_true", help="report the loss as the performance")
    parser.add_argument("--valid_on_train", action="store_true", help="evaluate on the (unaugmented) train split")
    if add_arguments is not None:
        add_arguments(parser)
    args, cfg = parse_config(parser, argv)
    if not cfg.TEST.MODEL_FILE:
        raise ConfigError("TEST.MODEL_FILE is empty: pass the checkpoint to evaluate, e.g. TEST.MODEL_FILE "
                          "output/<dataset>/<config name>/final_state.pth")
    the_task = get_task(task, cfg, full_test=True)
    dist_info = init_distributed(cfg.DEVICE, cfg.CPU_ALLOCATOR)
    setup_logging(dist_info.is_main)
    split = "train" if args.valid_on_train else "test"
    try:
        model, loader = load_for_test(the_task, split, dist_info)
        on_batch = batch_hook(args, cfg, loader) if batch_hook is not None else None
        metrics = evaluate(the_task, model, loader, dist_info.device, f_thres=eval_f_thres(cfg), desc="test",
                           on_batch=on_batch)
    finally:
        cleanup()
    if not dist_info.is_main:
        return metrics
    perf = metrics["loss"] if args.use_loss_as_perf else metrics[the_task.best_metric]
    log.info("%s on %s (%d samples), F_THRES %d: %s  solver steps %.1f  residual %.2e", cfg.TEST.MODEL_FILE,
             split, metrics["count"], eval_f_thres(cfg), the_task.describe(metrics), metrics["fwd_steps"],
             metrics["fwd_residual"])
    for name, values in metrics.items():  # per-class numbers (e.g. IoU), one line each
        if isinstance(values, list):
            log.info("%s: %s", name, " ".join(f"{i}:{v:.2f}" for i, v in enumerate(values)))
    print(f"{split} {'loss' if args.use_loss_as_perf else the_task.perf_label}: {perf:.4f}")
    if args.results_name:
        append_results_row(args.results_name, results_row(args.cfg, the_task, split, eval_f_thres(cfg), perf, metrics))
    return metrics


def load_for_test(task: Task, split: str, dist_info: DistInfo) -> tuple[nn.Module, Any]:
    """The task's model with ``TEST.MODEL_FILE`` loaded (seeded, on the run's device) and the un-augmented
    loader of ``split`` (this rank's shard)."""
    torch.manual_seed(task.cfg.SEED)
    model = task.build_model().to(dist_info.device)
    task.load_weights(model, task.cfg.TEST.MODEL_FILE)
    return model, task.build_loader(split, distributed=dist_info.distributed, augment=False)


def results_row(cfg_path: str, task: Task, split: str, f_thres: int, perf: float,
                metrics: dict[str, Any]) -> dict[str, Any]:
    """The CSV row of one evaluation (``--results_name``), the columns ``tools/plot_sweep.py`` reads."""
    cfg = task.cfg
    return {"config": cfg_path, "checkpoint": cfg.TEST.MODEL_FILE, "split": split, "seed": cfg.SEED,
            "f_solver": cfg.DEQ.F_SOLVER, "f_thres": f_thres, "f_eps": cfg.DEQ.F_EPS, "perf": perf,
            **task.result_fields(), **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
