"""deqlab's train (and MDEQ-TINY eval) steps against the original implementations, side by side in one run.

    git clone https://github.com/locuslab/mdeq /path/to/mdeq && pip install termcolor   # the original, as shipped
    git clone https://github.com/locuslab/deq /path/to/deq                # optional: its MDEQ-Vision
    git clone https://github.com/locuslab/torchdeq /path/to/torchdeq && pip install torchdeq==0.1.0   # optional
    python benchmarks/compare_original.py [--mdeq /path/to/mdeq] [--deq /path/to/deq] [--zoo /path/to/torchdeq]
                                          [--f-thres 10 22 30] [--batch 32] [--steps 3] [--variants ...]
                                          [--device cpu|cuda]
                                          [--out benchmarks/results/compare_original.json]
    python benchmarks/compare_original.py --task seg --mdeq /path/to/mdeq [--crop 128 64] [--batch 2] [...]
    python benchmarks/compare_original.py --task lm --deq /path/to/deq [--tgt-len 64] [--batch 8] [...]

``--task seg|lm`` (``compare_tasks.py``): the segmentation and DEQ-Transformer train steps against locuslab/mdeq's
and locuslab/deq's, from the same weights, after a check that both compute the same losses. The rest of this
docstring is about ``--task cls`` (the default).

The originals' code is imported from those checkouts at run time (never copied here) and runs as shipped, on
``--device`` (locuslab/deq's backward hook calls ``torch.cuda.synchronize()``, made a no-op without CUDA). All build MDEQ-TINY
(their ``cls_mdeq_TINY.yaml``/``small.yaml`` and ours: the same architecture), random init with seed 0, one
batch of random 32×32 images. ``t`` is the originals' ``F_THRES = B_THRES`` (their Broyden: f(z0) and t steps,
t + 1 f evaluations each way); every implementation spends the same t + 1 evaluations (ours: Broyden at the
same t, the same unit; ``floor``: fixed-point iteration at t + 1, see ``deqlab.solvers.budget_for_evals``).
First table: a train step is forward + cross-entropy + backward + Adam with Broyden forward and Broyden implicit
backward; an eval step is the no-grad forward; baselines locuslab/mdeq as shipped (``original``), the same with our
allocator setting (``original_retain``) and, with ``--deq``, locuslab/deq's MDEQ-Vision (``locuslab_deq``, Jacobian loss off).
Second table (``--zoo``): the phantom-gradient recipe, ours (``experiments/cifar/cls_mdeq_small_phantom.yaml``,
one supervised state like the zoo's) against the torchdeq zoo's ``deq-zoo/mdeq/mdeq_cifar`` with its
``run_small.sh`` flags (Broyden forward at ``t``, 5 phantom steps, τ 0.5, weight norm), with the same Adam step.
Ours runs with tolerance 0 so it never stops before the budget (the others may stop earlier on their own
tolerance: a conservative comparison). Each (implementation, t) runs in a fresh process, one after the other;
the median over ``--steps`` timed steps after one warm-up (``warm-up s``: the first step's extra time, with
``MODEL.COMPILE`` the compilation). ``VARIANTS`` below lists ours; ``floor`` is the cost of the cell's
evaluations and VJPs alone.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import compare_tasks
import originals

REPO = Path(__file__).resolve().parents[1]
CONFIG = "experiments/cifar/cls_mdeq_TINY.yaml"


# Our variants: the default (the original's algorithm and precision; CPU_ALLOCATOR retain, as the tools set it),
# the same with glibc's malloc left as it is, the cell compiled for the solver's no-grad iterations, channels-last
# (with and without the compiled cell), channels-last with bfloat16 autocast (CPU AMP: not the original's
# precision, reported beside it), and the f/VJP floor (plain fixed-point iteration both ways: only the cell's
# evaluations and VJPs, no solver work). ``original_retain`` is the original with our allocator setting.
VARIANTS = {
    "ours": [],  # MODEL.CHANNELS_LAST auto: NHWC on the CPU, NCHW on CUDA
    "ours_nchw": ["MODEL.CHANNELS_LAST", "False"],
    "ours_system_malloc": ["CPU_ALLOCATOR", "system"],
    "ours_compile": ["MODEL.COMPILE", "True"],
    "ours_nhwc": ["MODEL.CHANNELS_LAST", "True"],
    "ours_nhwc_compile": ["MODEL.CHANNELS_LAST", "True", "MODEL.COMPILE", "True"],
    "ours_nhwc_bf16": ["MODEL.CHANNELS_LAST", "True", "AMP.ENABLED", "True"],
    "floor": ["DEQ.F_SOLVER", "fixed_point", "DEQ.B_SOLVER", "fixed_point"],
}
ORIGINALS = ("original", "original_retain")
REPOS = {"mdeq": "github.com/locuslab/mdeq", "deq": "github.com/locuslab/deq", "zoo": "github.com/locuslab/torchdeq"}
SHORT = {"original": "orig", "original_retain": "kept", "locuslab_deq": "deq", "torchdeq_zoo": "zoo"}  # columns
# The phantom-gradient recipe (experiments/cifar/cls_mdeq_small_phantom.yaml, the zoo's run_small.sh values;
# LOSS.FPC off, as the zoo's one supervised state) against the torchdeq zoo's deq-zoo/mdeq/mdeq_cifar (--zoo).
PHANTOM_CONFIG = "experiments/cifar/cls_mdeq_small_phantom.yaml"
PHANTOM_VARIANTS = {
    "ours_phantom": [],
    "ours_phantom_nchw": ["MODEL.CHANNELS_LAST", "False"],
    "ours_phantom_nhwc": ["MODEL.CHANNELS_LAST", "True"],
    "ours_phantom_nhwc_compile": ["MODEL.CHANNELS_LAST", "True", "MODEL.COMPILE", "True"],
}


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # --device sets it in each child


def build_ours(f_thres: int, variant: str = "ours"):
    from deqlab.engine.evaluator import autocast_context
    from deqlab.models import build_model
    from deqlab.utils.cpu_allocator import configure_cpu_allocator

    if variant in PHANTOM_VARIANTS:
        config, overrides = PHANTOM_CONFIG, ["LOSS.FPC", "False", *PHANTOM_VARIANTS[variant]]
    else:
        config, overrides = CONFIG, ["DEQ.F_SOLVER", "broyden", "DEQ.B_SOLVER", "broyden", "DEQ.GRAD", "ift",
                                     "DEQ.B_EPS", "0.0", *VARIANTS[variant]]
    overrides = ["DEQ.F_EPS", "0.0", "TRAIN.PRETRAIN_STEPS", "0", "MODEL.DROPOUT", "0.0", *overrides]
    # what the originals' Broyden spends each way at F_THRES = B_THRES = t
    cfg = compare_tasks.at_original_budget(config, overrides, f_thres, ("broyden", "broyden"))
    f_thres = cfg.DEQ.F_THRES
    configure_cpu_allocator(cfg.CPU_ALLOCATOR)
    torch.manual_seed(0)
    model = build_model(cfg)

    def forward(x):
        with autocast_context(cfg, DEVICE):
            return model(x, train_step=10**9, f_thres=f_thres)[0].float()
    return model, forward


def time_steps(model, forward, batch: int, steps: int) -> dict:
    model.to(DEVICE)
    x = torch.randn(batch, 3, 32, 32, device=DEVICE)
    y = torch.randint(0, 10, (batch,), device=DEVICE)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def timed(step) -> float:
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def train_step():
        loss = F.cross_entropy(forward(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model.train()
    first, *train = [timed(train_step) for _ in range(steps + 1)]  # the first: with MODEL.COMPILE, compiling
    model.eval()
    with torch.no_grad():
        first_eval, *evals = [timed(lambda: forward(x)) for _ in range(steps + 1)]
    return {"train_s": statistics.median(train), "eval_s": statistics.median(evals),
            "warmup_s": first - statistics.median(train) + first_eval - statistics.median(evals)}


def run_child(args: argparse.Namespace, which: str, f_thres: int) -> dict:
    """Run ``which`` at ``f_thres`` in a fresh process (a timing, or the equal-weights ``check``)."""
    paths = [item for flag in ("mdeq", "deq", "zoo") if getattr(args, flag)
             for item in (f"--{flag}", str(Path(getattr(args, flag)).resolve()))]
    cmd = [sys.executable, str(Path(__file__).resolve()), *paths, "--task", args.task, "--child", which, str(f_thres),
           "--batch", str(args.batch), "--steps", str(args.steps), "--device", args.device, "--crop",
           *map(str, args.crop), "--tgt-len", str(args.tgt_len), "--weights", args.weights]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"error: the {which} step failed: {proc.stderr.strip().splitlines()[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(args: argparse.Namespace, variants: list[str], baselines: list[str]) -> list[dict]:
    """Per t, every variant one after the other; print and return rows with the ratio to each baseline."""
    cols = "".join(f" {'/' + SHORT[b]:>7} {'/' + SHORT[b]:>7}" for b in baselines)
    print(f"{'t':>3} {'variant':>26} {'train s':>8} {'eval s':>7} {'warm-up s':>9}{cols}   (train, eval per baseline)")
    rows = []
    for f_thres in args.f_thres:
        result = {which: run_child(args, which, f_thres) for which in variants}
        for which in variants:
            r = result[which]
            row = {"f_thres": f_thres, "batch": args.batch, "variant": which, **r}
            ratios = ""
            for b in baselines:
                row[f"train_ratio_{b}"] = r["train_s"] / result[b]["train_s"]
                row[f"eval_ratio_{b}"] = r["eval_s"] / result[b]["eval_s"]
                ratios += f" {row[f'train_ratio_{b}']:>7.2f} {row[f'eval_ratio_{b}']:>7.2f}"
            rows.append(row)
            print(f"{f_thres:>3} {which:>26} {r['train_s']:>8.3f} {r['eval_s']:>7.3f} {r['warmup_s']:>9.1f}{ratios}",
                  flush=True)
    return rows


def cls_child(args: argparse.Namespace) -> dict:
    """The ``--child WHICH T`` process of the classification comparison."""
    which, f_thres = args.child[0], int(args.child[1])
    if which == "locuslab_deq":
        model, forward = originals.deq_vision(args.deq, f_thres)
    elif which == "torchdeq_zoo":
        model, forward = originals.zoo(args.zoo, f_thres)
    elif which in VARIANTS or which in PHANTOM_VARIANTS:
        model, forward = build_ours(f_thres, which)
    else:
        model, forward = originals.mdeq_cls(args.mdeq, CONFIG, f_thres, retain=which == "original_retain")
    return time_steps(model, forward, args.batch, args.steps)


def checkouts(args: argparse.Namespace) -> None:
    """Exit with a clear message unless every checkout the task needs is given and is the expected repository."""
    needed = {"cls": [], "seg": ["mdeq"], "lm": ["deq"]}[args.task]  # cls without --mdeq: our variants only
    for flag in needed:
        if not getattr(args, flag):
            sys.exit(f"error: --task {args.task} needs --{flag}, a checkout of {REPOS[flag]}")
    for flag in ("mdeq", "deq", "zoo"):
        path = getattr(args, flag)
        marker = "MDEQ-Vision/lib/models/mdeq.py" if (flag, args.task) == ("deq", "cls") else originals.MARKERS[flag]
        if path and not (Path(path) / marker).is_file():
            sys.exit(f"error: --{flag} {path} is not a checkout of {REPOS[flag]} (no {marker})")


def main(argv: list[str] | None = None) -> None:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("cls", "seg", "lm"), default="cls",
                        help="cls: MDEQ-TINY (default); seg: MDEQ-SMALL segmentation; lm: the DEQ-Transformer")
    parser.add_argument("--mdeq", default="", help="a checkout of github.com/locuslab/mdeq (seg; cls: "
                        "without it, our variants only, no ratios)")
    parser.add_argument("--deq", default="", help="a checkout of github.com/locuslab/deq: lm's original "
                        "(DEQ-Sequence); with cls, its MDEQ-Vision is timed too (locuslab_deq, a third baseline)")
    parser.add_argument("--zoo", default="", help="optional, cls: a checkout of github.com/locuslab/torchdeq: its "
                        "deq-zoo MDEQ's phantom recipe is timed against ours in a second table")
    parser.add_argument("--f-thres", type=int, nargs="+", default=[10, 22, 30])
    parser.add_argument("--batch", type=int, help="default: 32 (cls), 2 (seg), 8 (lm)")
    parser.add_argument("--crop", type=int, nargs=2, default=[128, 64], metavar=("W", "H"), help="seg's input size")
    parser.add_argument("--tgt-len", type=int, default=64, help="lm's tokens per stream (and its memory length)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variants", nargs="+", help="our variants to time beside the original (default: all "
                        f"of the task's: cls {', '.join(VARIANTS)}; seg {', '.join(compare_tasks.VARIANTS['seg'])}; "
                        f"lm {', '.join(compare_tasks.VARIANTS['lm'])})")
    parser.add_argument("--device", default=str(DEVICE), choices=("cpu", "cuda"),
                        help="where every implementation runs (default: cuda when available; seg and lm: cpu)")
    parser.add_argument("--out", help="default: benchmarks/results/compare_original[_TASK].json")
    parser.add_argument("--child", nargs=2, metavar=("WHICH", "F_THRES"), help=argparse.SUPPRESS)
    parser.add_argument("--weights", default="", help=argparse.SUPPRESS)  # the check's, for every timed process
    args = parser.parse_args(argv)
    args.batch = args.batch or {"cls": 32, "seg": 2, "lm": 8}[args.task]
    args.roots = {"seg": args.mdeq, "lm": args.deq}
    if args.child:
        DEVICE = torch.device(args.device)
        print(json.dumps(cls_child(args) if args.task == "cls" else compare_tasks.child(args)))
        return
    checkouts(args)
    known = VARIANTS if args.task == "cls" else compare_tasks.VARIANTS[args.task]
    args.variants = args.variants or list(known)
    if unknown := [v for v in args.variants if v not in known]:
        sys.exit(f"error: --task {args.task} has no variant {', '.join(unknown)}; known: {', '.join(known)}")
    if args.task != "cls" and args.device != "cpu":
        sys.exit(f"error: --task {args.task} runs on the CPU only (locuslab/deq's DEQ-Transformer makes its "
                 "states on the default device); use --device cpu")
    phantom = []
    if args.task == "cls":
        # Baselines: the original as shipped, the original with our allocator setting, locuslab/deq's MDEQ-Vision.
        baselines = [*(ORIGINALS if args.mdeq else ()), *(["locuslab_deq"] if args.deq else [])]
        rows = compare(args, [*baselines, *args.variants], baselines)
        if args.zoo:
            print("\nphantom-gradient recipe against the torchdeq zoo's (deq-zoo/mdeq/mdeq_cifar, run_small.sh)")
            phantom = compare(args, ["torchdeq_zoo", *PHANTOM_VARIANTS], ["torchdeq_zoo"])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            args.weights = str(Path(tmp) / "weights.pt")
            rows = compare_tasks.compare(args, lambda which, f_thres: run_child(args, which, f_thres))
    out = Path(args.out or REPO / f"benchmarks/results/compare_original{'' if args.task == 'cls' else '_' + args.task}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"task": args.task, "rows": rows, "phantom_rows": phantom, "device": args.device,
                               "torch": torch.__version__}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
