"""Evaluate a classifier checkpoint: ``python tools/cls_valid.py --cfg FILE TEST.MODEL_FILE ckpt.pth [KEY VALUE ...]``.

Prints top-1/top-5, loss, mean forward solver steps and final residual; ``--results_name runs.csv`` appends
one row per call (handy for sweeping ``DEQ.F_THRES`` at test time).
"""
import csv
import logging
from pathlib import Path

import torch

from deqlab.checkpoint import load_weights
from deqlab.data import build_loader
from deqlab.engine import evaluate, setup_logging
from deqlab.engine.cli import parse_config, run_tool, tool_parser
from deqlab.errors import ConfigError
from deqlab.models import build_model
from deqlab.utils.dist import cleanup, init_distributed

log = logging.getLogger("deqlab")


def main() -> None:
    parser = tool_parser(__doc__.splitlines()[0])
    parser.add_argument("--results_name", default="", help="CSV file to append this evaluation's row to")
    parser.add_argument("--use_loss_as_perf", action="store_true", help="report the loss as the performance")
    parser.add_argument("--valid_on_train", action="store_true", help="evaluate on the (unaugmented) train split")
    parser.add_argument("--seed", type=int, default=None, help="overrides SEED")
    args, cfg = parse_config(parser)
    if args.seed is not None:
        cfg.defrost()
        cfg.SEED = args.seed
        cfg.freeze()
    if not cfg.TEST.MODEL_FILE:
        raise ConfigError("TEST.MODEL_FILE is empty: pass the checkpoint to evaluate, e.g. TEST.MODEL_FILE "
                          "output/cifar10/cls_mdeq_TINY/final_state.pth")
    dist_info = init_distributed(cfg.DEVICE)
    setup_logging(dist_info.is_main)
    try:
        torch.manual_seed(cfg.SEED)
        model = build_model(cfg).to(dist_info.device)
        load_weights(model, cfg.TEST.MODEL_FILE)
        split = "train" if args.valid_on_train else "test"
        loader = build_loader(cfg, split, distributed=dist_info.distributed, augment=False)
        metrics = evaluate(model, loader, cfg, dist_info.device, f_thres=cfg.DEQ.F_THRES)
    finally:
        cleanup()
    if not dist_info.is_main:
        return
    perf = metrics["loss"] if args.use_loss_as_perf else metrics["top1"]
    log.info("%s on %s (%d images), F_THRES %d: top-1 %.2f%%  top-5 %.2f%%  loss %.4f  solver steps %.1f  "
             "residual %.2e", cfg.TEST.MODEL_FILE, split, metrics["count"], cfg.DEQ.F_THRES, metrics["top1"],
             metrics["top5"], metrics["loss"], metrics["fwd_steps"], metrics["fwd_residual"])
    label = "loss" if args.use_loss_as_perf else "accuracy (top-1, %)"
    print(f"{split} {label}: {perf:.4f}")
    if args.results_name:
        path = Path(args.results_name)
        row = {"config": args.cfg, "checkpoint": cfg.TEST.MODEL_FILE, "split": split, "seed": cfg.SEED,
               "f_solver": cfg.DEQ.F_SOLVER, "f_thres": cfg.DEQ.F_THRES, "perf": perf, **metrics}
        new = not path.is_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)


if __name__ == "__main__":
    run_tool(main)
