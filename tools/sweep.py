"""Sweep the test-time solver budget of one checkpoint: ``python tools/sweep.py --cfg FILE --checkpoint CKPT
--f_thres 1 2 4 8 16 32 --results_name out.csv [--task cls|seg|lm] [--on_train] [--use_loss_as_perf] [KEY VALUE ...]``.

Loads the model once and evaluates it with the task's full test procedure (the test tools' ``full_test``:
sliding windows for segmentation, carried memory for a language model) at every forward budget
(``DEQ.F_THRES`` in the solver's own unit: Broyden steps after f(z0), Anderson or fixed-point f evaluations;
the solver stopping earlier at ``DEQ.F_EPS``); appends one CSV row per budget with the columns the test tools
write (config, checkpoint, split, seed, f_solver, f_thres, f_eps, perf, the task's metrics, loss, fwd_steps =
mean forward solver steps per sample, fwd_nfe = mean forward f evaluations per sample, fwd_residual = mean final
relative residual, count). ``tools/plot_sweep.py`` draws the file. Works for any task in ``deqlab.tasks.TASKS``; under torchrun
every rank evaluates its shard and rank 0 writes the rows. ``--seed N`` as for the test tools (the run that
made a ``final_state_seedN.pth.tar`` is told by its file name anyway).

Example::

    python tools/sweep.py --cfg experiments/fashion_mnist/cls_mdeq_quickstart.yaml \\
        --checkpoint output/fashion_mnist/cls_mdeq_quickstart/final_state.pth \\
        --f_thres 1 2 4 8 16 32 --results_name sweep.csv
"""
from __future__ import annotations

import argparse
import logging
from typing import Any

from deqlab.compat import parse_anywhere
from deqlab.engine.cli import config_from_args, run_tool, tool_parser
from deqlab.engine.divergence import check_evaluation
from deqlab.engine.evaluator import eval_f_thres, evaluate
from deqlab.engine.launch import (append_results_row, check_output, check_results_csv, load_for_test, results_columns,
                                  results_row)
from deqlab.engine.logs import setup_logging
from deqlab.errors import ConfigError
from deqlab.tasks import TASKS, get_task
from deqlab.utils.dist import cleanup, init_distributed

log = logging.getLogger("deqlab")


def parser() -> argparse.ArgumentParser:
    p = tool_parser(__doc__)
    p.add_argument("--checkpoint", default="", help="weights to evaluate (default: TEST.MODEL_FILE)")
    # str, not int: argparse hands "--f_thres 1 2 4 DEQ.F_EPS 1e-3" all to --f_thres; the KEY VALUE pairs
    # after the budgets are moved back to the overrides (split_budgets)
    p.add_argument("--f_thres", nargs="+", default=[], metavar="N",
                   help="forward solver budgets (default: the TEST.F_THRES / DEQ.F_THRES of the config)")
    p.add_argument("--task", default="cls", help=f"registered task ({', '.join(sorted(TASKS))}; default cls)")
    p.add_argument("--on_train", "--valid_on_train", dest="on_train", action="store_true",
                   help="evaluate on the (unaugmented) train split")
    p.add_argument("--use_loss_as_perf", action="store_true", help="the perf column is the loss")
    p.add_argument("--results_name", "--results_file", dest="results_name", default="",
                   help="CSV file to append the rows to")
    return p


def split_budgets(values: list[str]) -> tuple[list[int], list[str]]:
    """The leading integers of ``--f_thres`` and what follows them (config overrides)."""
    budgets: list[int] = []
    for i, value in enumerate(values):
        try:
            budgets.append(int(value))
        except ValueError:
            return budgets, values[i:]
    return budgets, []


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the sweep; return the rows (also appended to ``--results_name`` by rank 0)."""
    p = parser()
    parsed = parse_anywhere(p, argv)
    budgets, overrides = split_budgets(parsed.f_thres)
    if (parsed.f_thres and not budgets) or (budgets and min(budgets) < 1):
        bad = next((v for v in parsed.f_thres if not v.lstrip("-").isdigit() or int(v) < 1), parsed.f_thres[0])
        raise ConfigError(f"--f_thres expects forward solver budgets, whole numbers >= 1 (e.g. --f_thres 1 2 4 8), "
                          f"got {bad!r}")
    # --checkpoint is TEST.MODEL_FILE (last, so it wins): the rows name it as the test tools' rows do
    parsed.opts = overrides + list(parsed.opts) + (["TEST.MODEL_FILE", parsed.checkpoint] if parsed.checkpoint
                                                   else [])
    args, cfg = config_from_args(parsed)
    if args.results_name:
        check_output(args.results_name, "--results_name")
    if not cfg.TEST.MODEL_FILE:
        raise ConfigError("--checkpoint CKPT (or TEST.MODEL_FILE) is required: the weights to sweep")
    budgets = budgets or [eval_f_thres(cfg)]
    task = get_task(args.task, cfg, full_test=True)
    dist_info = init_distributed(cfg.DEVICE, cfg.CPU_ALLOCATOR)
    setup_logging(dist_info.is_main)
    split = "train" if args.on_train else "test"
    rows = []
    try:
        model, loader = load_for_test(task, split, dist_info)
        if args.results_name:  # every rank: the columns come from an (empty) evaluation, summed over ranks
            check_results_csv(args.results_name, results_columns(args.cfg, task, split, model, dist_info.device))
        for budget in budgets:
            metrics = evaluate(task, model, loader, dist_info.device, f_thres=budget, desc=f"F_THRES {budget}")
            check_evaluation(metrics, cfg.TEST.MODEL_FILE)
            perf = metrics["loss"] if args.use_loss_as_perf else metrics[task.best_metric]
            row = results_row(args.cfg, task, split, budget, perf, metrics)
            rows.append(row)
            if dist_info.is_main:
                log.info("F_THRES %d on %s: %s  solver steps %.2f  f evals %.2f  residual %.2e", budget, split,
                         task.describe(metrics), metrics["fwd_steps"], metrics["fwd_nfe"], metrics["fwd_residual"])
                if args.results_name:
                    append_results_row(args.results_name, row)
    finally:
        cleanup()
    if dist_info.is_main:
        label = "loss" if args.use_loss_as_perf else task.perf_label
        for row in rows:
            print(f"F_THRES {row['f_thres']:>3}: {split} {label} {row['perf']:.6g}  "
                  f"steps {row['fwd_steps']:.2f}  f evals {row['fwd_nfe']:.2f}  residual {row['fwd_residual']:.2e}")
    return rows


if __name__ == "__main__":
    run_tool(main)
