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
from deqlab.engine.divergence import check_evaluation
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


def check_output(path: str | Path, flag: str, folder: bool = False) -> None:
    """Refuse, in one line and before any work, an output the tool could not write at the end: a folder where
    ``flag`` names a file (``folder`` False) or a file where it names a folder, or a path under a file."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise ConfigError(f"{flag} {path} is a {'file' if folder else 'folder'}: expected "
                          f"{'a folder to write into' if folder else 'a file to append to'}")
    blocking = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise ConfigError(f"{flag} {path}: {blocking} is a file, not a folder")


def check_results_csv(path: str | Path, columns: list[str]) -> list[str]:
    """The header to append a row with ``columns`` to the CSV at ``path`` under: ``columns`` for a new or empty
    file, the file's own header when it has the same columns; a header that differs (another task's rows,
    another version's columns) is refused in one line naming the difference, so rows never lose columns and
    ``perf`` never mixes metrics."""
    check_output(path, "--results_name")
    path = Path(path)
    if not path.is_file() or not path.stat().st_size:
        return list(columns)
    with path.open(newline="") as fh:
        header = next(csv.reader(fh), [])
    missing, extra = [c for c in columns if c not in header], [c for c in header if c not in columns]
    if missing or extra:
        diff = [f"its header lacks {', '.join(missing)}"] * bool(missing) + [
            f"it has {', '.join(extra)}, which this row lacks"] * bool(extra)
        raise ConfigError(f"--results_name {path} holds rows of another kind ({'; '.join(diff)}): append to a "
                          f"new file")
    return header


def append_results_row(path: str | Path, row: dict[str, Any]) -> None:
    """Append ``row`` to the CSV at ``path`` (a new file gets a header; an existing one must have the row's
    columns, :func:`check_results_csv`)."""
    path = Path(path)
    fields = check_results_csv(path, list(row))
    new = not path.is_file() or not path.stat().st_size
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerow(row)


def results_columns(cfg_path: str, task: Task, split: str, model: nn.Module, device: torch.device) -> list[str]:
    """The columns of an evaluation's ``--results_name`` row, known before it runs: those of the row that an
    evaluation of no batch gives (every metric is there, as an empty sum; the spectral radius, which a real
    evaluation estimates on every batch when asked to, is added)."""
    metrics = evaluate(task, model, [], device, desc="columns")
    if task.cfg.DEQ.SPECTRAL_RADIUS_MODE:
        metrics["sradius"] = 0.0
    return list(results_row(cfg_path, task, split, 0, 0.0, metrics))


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
    if args.results_name:
        check_output(args.results_name, "--results_name")
    if not cfg.TEST.MODEL_FILE:
        raise ConfigError("TEST.MODEL_FILE is empty: pass the checkpoint to evaluate, e.g. TEST.MODEL_FILE "
                          "output/<dataset>/<config name>/final_state.pth")
    the_task = get_task(task, cfg, full_test=True)
    dist_info = init_distributed(cfg.DEVICE, cfg.CPU_ALLOCATOR)
    setup_logging(dist_info.is_main)
    split = "train" if args.valid_on_train else "test"
    try:
        model, loader = load_for_test(the_task, split, dist_info)
        if args.results_name:  # every rank: the columns come from an (empty) evaluation, summed over ranks
            check_results_csv(args.results_name, results_columns(args.cfg, the_task, split, model, dist_info.device))
        on_batch = batch_hook(args, cfg, loader) if batch_hook is not None else None
        metrics = evaluate(the_task, model, loader, dist_info.device, f_thres=eval_f_thres(cfg), desc="test",
                           on_batch=on_batch)
        check_evaluation(metrics, cfg.TEST.MODEL_FILE)
    finally:
        cleanup()
    if not dist_info.is_main:
        return metrics
    perf = metrics["loss"] if args.use_loss_as_perf else metrics[the_task.best_metric]
    log.info("%s on %s (%d samples), F_THRES %d: %s  solver steps %.1f  f evals %.1f  residual %.2e",
             cfg.TEST.MODEL_FILE, split, metrics["count"], eval_f_thres(cfg), the_task.describe(metrics),
             metrics["fwd_steps"], metrics["fwd_nfe"], metrics["fwd_residual"])
    for name, values in metrics.items():  # per-class numbers (e.g. IoU), one line each
        if isinstance(values, list):
            log.info("%s: %s", name, " ".join(f"{i}:{v:.2f}" for i, v in enumerate(values)))
    print(f"{split} {'loss' if args.use_loss_as_perf else the_task.perf_label}: {perf:.6g}")
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
