"""MDEQ-TINY train and eval steps, deqlab against the original locuslab/mdeq, side by side in one run.

    git clone https://github.com/locuslab/mdeq /path/to/mdeq && pip install termcolor   # the original, as shipped
    python benchmarks/compare_original.py --mdeq /path/to/mdeq [--f-thres 10 22 30] [--batch 32] [--steps 3]
                                          [--variants ours ours_nhwc ours_nhwc_bf16 floor]
                                          [--out benchmarks/results/compare_original.json]

The original's code is imported from that checkout at run time (never copied here). Both build MDEQ-TINY from
``experiments/cifar/cls_mdeq_TINY.yaml`` (theirs and ours: the same model), random init with seed 0, one batch
of random 32×32 images; a train step is forward + cross-entropy + backward + Adam step with Broyden forward and
Broyden (implicit) backward, both at ``F_THRES = B_THRES = t``; an eval step is the no-grad forward at ``t``.
Ours runs with tolerance 0 so it never stops before the budget (the original's solvers may stop earlier on their
own tolerance: a conservative comparison). Each (implementation, t) runs in a fresh process, one after the other;
the median over ``--steps`` timed steps after one warm-up. The table gives each variant's time and its ratio to
the original's (``VARIANTS`` below: ``floor`` is the cost of the cell's evaluations and VJPs alone).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
CONFIG = "experiments/cifar/cls_mdeq_TINY.yaml"


# Our variants: the default (the original's algorithm and precision; CPU_ALLOCATOR retain, as the tools set it),
# the same with glibc's malloc left as it is, the cell compiled for the solver's no-grad iterations, channels-last
# (with and without the compiled cell), channels-last with bfloat16 autocast (CPU AMP: not the original's
# precision, reported beside it), and the f/VJP floor (plain fixed-point iteration both ways: only the cell's
# evaluations and VJPs, no solver work). ``original_retain`` is the original with our allocator setting.
VARIANTS = {
    "ours": [],
    "ours_system_malloc": ["CPU_ALLOCATOR", "system"],
    "ours_compile": ["MODEL.COMPILE", "True"],
    "ours_nhwc": ["MODEL.CHANNELS_LAST", "True"],
    "ours_nhwc_compile": ["MODEL.CHANNELS_LAST", "True", "MODEL.COMPILE", "True"],
    "ours_nhwc_bf16": ["MODEL.CHANNELS_LAST", "True", "AMP.ENABLED", "True"],
    "floor": ["DEQ.F_SOLVER", "fixed_point", "DEQ.B_SOLVER", "fixed_point"],
}
ORIGINALS = ("original", "original_retain")


def build_ours(f_thres: int, variant: str = "ours"):
    from deqlab.config import load_config
    from deqlab.engine.evaluator import autocast_context
    from deqlab.models import build_model
    from deqlab.utils.cpu_allocator import configure_cpu_allocator

    cfg = load_config(REPO / CONFIG, ["DEQ.F_SOLVER", "broyden", "DEQ.B_SOLVER", "broyden", "DEQ.GRAD", "ift",
                                      "DEQ.F_THRES", str(f_thres), "DEQ.B_THRES", str(f_thres), "DEQ.F_EPS", "0.0",
                                      "DEQ.B_EPS", "0.0", "TRAIN.PRETRAIN_STEPS", "0", "MODEL.DROPOUT", "0.0",
                                      *VARIANTS[variant]])
    configure_cpu_allocator(cfg.CPU_ALLOCATOR)
    torch.manual_seed(0)
    model = build_model(cfg)

    def forward(x):
        with autocast_context(cfg, torch.device("cpu")):
            return model(x, train_step=10**9, f_thres=f_thres)[0].float()
    return model, forward


def build_original(root: str, f_thres: int, retain: bool = False):
    if retain:
        from deqlab.utils.cpu_allocator import retain_freed_memory
        retain_freed_memory()
    sys.path[:0] = [f"{root}/lib", f"{root}/lib/models", f"{root}/lib/modules"]
    os.chdir(root)  # the original resolves some imports and paths from its root
    from config import config  # noqa: E402  (the original's yacs defaults)
    import models  # noqa: E402

    config.defrost()
    config.merge_from_file(CONFIG)
    config.MODEL.F_THRES, config.MODEL.B_THRES, config.MODEL.DROPOUT = f_thres, f_thres, 0.0
    config.freeze()
    torch.manual_seed(0)
    model = models.mdeq.get_cls_net(config)

    def forward(x):
        out = model(x, train_step=10**9, f_thres=f_thres, b_thres=f_thres)
        return out[0] if isinstance(out, (tuple, list)) else out
    return model, forward


def time_steps(model, forward, batch: int, steps: int) -> dict:
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    train = []
    for i in range(steps + 1):
        start = time.perf_counter()
        loss = F.cross_entropy(forward(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        train.append(time.perf_counter() - start)
    first, train = train[0], train[1:]  # the warm-up step: with MODEL.COMPILE it includes the compilation
    model.eval()
    evals = []
    with torch.no_grad():
        for i in range(steps + 1):
            start = time.perf_counter()
            forward(x)
            evals.append(time.perf_counter() - start)
    return {"train_s": statistics.median(train), "eval_s": statistics.median(evals[1:]),
            "warmup_s": first - statistics.median(train) + evals[0] - statistics.median(evals[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mdeq", required=True, help="a checkout of github.com/locuslab/mdeq")
    parser.add_argument("--f-thres", type=int, nargs="+", default=[10, 22, 30])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS),
                        help="our variants to time beside the original (default: all)")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/compare_original.json"))
    parser.add_argument("--child", nargs=2, metavar=("WHICH", "F_THRES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        which, f_thres = args.child[0], int(args.child[1])
        model, forward = (build_ours(f_thres, which) if which in VARIANTS else
                          build_original(args.mdeq, f_thres, retain=which == "original_retain"))
        print(json.dumps(time_steps(model, forward, args.batch, args.steps)))
        return
    if not (Path(args.mdeq) / "lib/models/mdeq.py").is_file():
        sys.exit(f"error: --mdeq {args.mdeq} is not a locuslab/mdeq checkout (no lib/models/mdeq.py)")
    variants = [*ORIGINALS, *args.variants]
    rows = []
    # /orig: ratio to the original as shipped; /kept: to the original run with our allocator setting
    header = (f"{'t':>3} {'variant':>18} {'train s':>8} {'/orig':>6} {'/kept':>6} {'eval s':>7} {'/orig':>6} "
              f"{'/kept':>6} {'warm-up s':>9}")
    print(header)
    for f_thres in args.f_thres:
        result = {}
        for which in variants:  # one after the other, each in a fresh process
            cmd = [sys.executable, str(Path(__file__).resolve()), "--mdeq", str(Path(args.mdeq).resolve()),
                   "--child", which, str(f_thres), "--batch", str(args.batch), "--steps", str(args.steps)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"error: the {which} step failed: {proc.stderr.strip().splitlines()[-1]}")
            result[which] = json.loads(proc.stdout.strip().splitlines()[-1])
        orig, kept = result["original"], result["original_retain"]
        for which in variants:
            r = result[which]
            row = {"f_thres": f_thres, "batch": args.batch, "variant": which, **r,
                   "train_ratio": r["train_s"] / orig["train_s"], "eval_ratio": r["eval_s"] / orig["eval_s"],
                   "train_ratio_retain": r["train_s"] / kept["train_s"],
                   "eval_ratio_retain": r["eval_s"] / kept["eval_s"]}
            rows.append(row)
            print(f"{f_thres:>3} {which:>18} {r['train_s']:>8.3f} {row['train_ratio']:>6.2f} "
                  f"{row['train_ratio_retain']:>6.2f} {r['eval_s']:>7.3f} {row['eval_ratio']:>6.2f} "
                  f"{row['eval_ratio_retain']:>6.2f} {r['warmup_s']:>9.1f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "torch": torch.__version__}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
