"""Skip DEQ on the embedded Fashion-MNIST default: forward f evaluations, accuracy and time, per MODEL.SKIP.

    python benchmarks/skip_deq.py [--variants none skip skipreg] [--epochs E] [--seed 0] [--eps 1e-3]
                                  [--max-f-thres 60] [--out benchmarks/results/skip_deq.json] [KEY VALUE ...]

Trains ``experiments/fashion_mnist/cls_mdeq_quickstart{,_skip,_skipreg}.yaml`` one after the other in this
process, at the same seed and epochs (KEY VALUE overrides go to all, e.g. ``PERCENT 0.1`` for a smoke run),
timing every training epoch, then evaluates each final model on the full test set twice:

- at the trained budget (``DEQ.F_THRES`` of the config, 8): top-1 and residual, the number to compare;
- to a tolerance: ``DEQ.F_EPS`` = ``--eps`` (relative residual, the config's stop mode) with up to
  ``--max-f-thres`` steps: the forward f evaluations needed to get there (per batch solve: the solver
  stops when every image of the batch is under the tolerance, so this is also the count per test image),
  its top-1 and the evaluation's wall time.

``skipreg`` counts the one f evaluation that makes its initial state f(0; x); ``skip``'s predictor is an
explicit conv stack, not an f evaluation: its cost is in the wall times. Run on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from deqlab.config import load_config
from deqlab.engine import Trainer
from deqlab.engine.evaluator import evaluate

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"none": "cls_mdeq_quickstart.yaml", "skip": "cls_mdeq_quickstart_skip.yaml",
           "skipreg": "cls_mdeq_quickstart_skipreg.yaml"}


def run_variant(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train one variant and evaluate it at the trained budget and to the tolerance."""
    path = REPO / "experiments/fashion_mnist" / CONFIGS[variant]
    out = Path(args.work_dir) / variant
    overrides = ["SEED", str(args.seed), "OUTPUT_DIR", str(out), "LOG_DIR", str(out / "log"), *args.opts]
    if args.epochs:
        overrides += ["TRAIN.END_EPOCH", str(args.epochs)]
    cfg = load_config(path, overrides)
    trainer = Trainer(cfg, path)
    epoch_times: list[float] = []
    train_epoch = trainer.train_epoch

    def timed_epoch() -> dict[str, float]:  # the training epochs alone, without their evaluations
        start = time.perf_counter()
        stats = train_epoch()
        epoch_times.append(time.perf_counter() - start)
        return stats

    trainer.train_epoch = timed_epoch  # type: ignore[method-assign]
    trainer.fit()
    model, task, loader = trainer.net, trainer.task, trainer.test_loader
    trained = evaluate(task, model, loader, trainer.device, f_thres=cfg.DEQ.F_THRES, desc=f"{variant} trained")
    trainer.model.deq.f_tol = args.eps  # the tolerance run: the same weights, the solver stopping at --eps
    start = time.perf_counter()
    to_eps = evaluate(task, model, loader, trainer.device, f_thres=args.max_f_thres, desc=f"{variant} to eps")
    eval_time = time.perf_counter() - start
    return {
        "variant": variant, "config": str(path.relative_to(REPO)), "seed": args.seed, "epochs": len(epoch_times),
        "train_images": len(trainer.train_loader.dataset),
        "epoch_s": epoch_times, "mean_epoch_s": sum(epoch_times) / len(epoch_times),
        "params": sum(p.numel() for p in trainer.model.parameters()),
        "trained_f_thres": cfg.DEQ.F_THRES, "top1_trained": trained["top1"],
        "residual_trained": trained["fwd_residual"], "f_evals_trained": trained["fwd_nfe"],
        "eps": args.eps, "max_f_thres": args.max_f_thres, "f_evals_to_eps": to_eps["fwd_nfe"],
        "top1_to_eps": to_eps["top1"], "residual_to_eps": to_eps["fwd_residual"], "eval_to_eps_s": eval_time,
        "test_images": to_eps["count"],
    }


def table(rows: list[dict[str, Any]]) -> str:
    base = next((r for r in rows if r["variant"] == "none"), rows[0])
    lines = [f"| MODEL.SKIP | params | train s/epoch | top-1 @ F_THRES {base['trained_f_thres']} | "
             f"f evals to rel. residual {base['eps']:g} | ratio to none | top-1 there | test eval s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['params']:,} | {r['mean_epoch_s']:.1f} | {r['top1_trained']:.2f} | "
                     f"{r['f_evals_to_eps']:.2f} | {base['f_evals_to_eps'] / r['f_evals_to_eps']:.2f}x | "
                     f"{r['top1_to_eps']:.2f} | {r['eval_to_eps_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=tuple(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--epochs", type=int, default=0, help="TRAIN.END_EPOCH (default: the configs' 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eps", type=float, default=1e-3, help="relative residual to solve to at test time")
    parser.add_argument("--max-f-thres", type=int, default=60, help="step limit of the solve to --eps")
    parser.add_argument("--work-dir", default=str(REPO / "output/bench_skip_deq"))
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/skip_deq.json"))
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every variant")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    rows = []
    for variant in args.variants:
        rows.append(run_variant(variant, args))
        print(table(rows), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                          "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
