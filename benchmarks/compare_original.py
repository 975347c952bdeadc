"""MDEQ-TINY train and eval steps, deqlab against the original implementations, side by side in one run.

    git clone https://github.com/locuslab/mdeq /path/to/mdeq && pip install termcolor   # the original, as shipped
    git clone https://github.com/locuslab/deq /path/to/deq                # optional: its MDEQ-Vision
    git clone https://github.com/locuslab/torchdeq /path/to/torchdeq && pip install torchdeq==0.1.0   # optional
    python benchmarks/compare_original.py [--mdeq /path/to/mdeq] [--deq /path/to/deq] [--zoo /path/to/torchdeq]
                                          [--f-thres 10 22 30] [--batch 32] [--steps 3] [--variants ...]
                                          [--device cpu|cuda]
                                          [--out benchmarks/results/compare_original.json]

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
    from deqlab.config import load_config
    from deqlab.engine.evaluator import autocast_context
    from deqlab.models import build_model
    from deqlab.solvers import budget_for_evals, max_evals
    from deqlab.utils.cpu_allocator import configure_cpu_allocator

    if variant in PHANTOM_VARIANTS:
        config, overrides = PHANTOM_CONFIG, ["LOSS.FPC", "False", *PHANTOM_VARIANTS[variant]]
    else:
        config, overrides = CONFIG, ["DEQ.F_SOLVER", "broyden", "DEQ.B_SOLVER", "broyden", "DEQ.GRAD", "ift",
                                     "DEQ.B_EPS", "0.0", *VARIANTS[variant]]
    overrides = ["DEQ.F_EPS", "0.0", "TRAIN.PRETRAIN_STEPS", "0", "MODEL.DROPOUT", "0.0", *overrides]
    solvers = load_config(REPO / config, overrides).DEQ
    evals = max_evals("broyden", f_thres)  # what the originals spend each way at F_THRES = B_THRES = t
    f_thres = budget_for_evals(solvers.F_SOLVER, evals)
    cfg = load_config(REPO / config, [*overrides, "DEQ.F_THRES", str(f_thres),
                                      "DEQ.B_THRES", str(budget_for_evals(solvers.B_SOLVER, evals))])
    configure_cpu_allocator(cfg.CPU_ALLOCATOR)
    torch.manual_seed(0)
    model = build_model(cfg)

    def forward(x):
        with autocast_context(cfg, DEVICE):
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


def build_deq_vision(root: str, f_thres: int):
    """locuslab/deq's MDEQ-Vision (the later MDEQ code: its own solvers and Jacobian regulariser, off here)."""
    vision = Path(root) / "MDEQ-Vision"
    sys.path[:0] = [str(vision / "lib")]
    os.chdir(vision)  # it appends "lib/", "lib/models" and "../" (for the repository's lib/) to sys.path
    if not torch.cuda.is_available():  # its backward hook calls torch.cuda.synchronize() unconditionally
        torch.cuda.synchronize = lambda *args, **kwargs: None
    from config import config  # noqa: E402  (MDEQ-Vision's yacs defaults)
    import models  # noqa: E402

    config.defrost()
    config.merge_from_file("experiments/cifar/cls_mdeq_TINY.yaml")
    config.DEQ.F_THRES, config.DEQ.B_THRES, config.MODEL.DROPOUT = f_thres, f_thres, 0.0
    config.freeze()
    torch.manual_seed(0)
    model = models.mdeq.get_cls_net(config)

    def forward(x):
        return model(x, train_step=10**9, compute_jac_loss=False, f_thres=f_thres, b_thres=f_thres)[0]
    return model, forward


def build_zoo(root: str, f_thres: int):
    """The torchdeq zoo's MDEQ (deq-zoo/mdeq/mdeq_cifar, needs ``pip install torchdeq``) with run_small.sh's
    flags: weight norm, Broyden forward at ``f_thres``, phantom gradient of 5 steps with tau 0.5."""
    import argparse as _argparse

    from torchdeq.utils import add_deq_args

    zoo = Path(root) / "deq-zoo/mdeq/mdeq_cifar"
    sys.path[:0] = [str(zoo / "mdeq")]
    os.chdir(zoo)
    from config import config  # noqa: E402  (the zoo's yacs defaults)
    import models  # noqa: E402

    parser = _argparse.ArgumentParser()
    add_deq_args(parser)
    args = parser.parse_args(["--norm_type", "weight_norm", "--f_solver", "broyden", "--f_max_iter", str(f_thres),
                              "--grad", "5", "--tau", "0.5"])
    config.defrost()
    config.merge_from_file("configs/small.yaml")
    config.freeze()
    torch.manual_seed(0)
    model = models.mdeq.get_cls_net(config, args)

    def forward(x):
        out = model(x, train_step=10**9)
        return out[-1] if isinstance(out, list) else out  # training: one output per supervised state (one)
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
    """Time ``which`` at ``f_thres`` in a fresh process."""
    paths = [item for flag in ("mdeq", "deq", "zoo") if getattr(args, flag)
             for item in (f"--{flag}", str(Path(getattr(args, flag)).resolve()))]
    cmd = [sys.executable, str(Path(__file__).resolve()), *paths, "--child", which, str(f_thres),
           "--batch", str(args.batch), "--steps", str(args.steps), "--device", args.device]
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


def main() -> None:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mdeq", default="", help="a checkout of github.com/locuslab/mdeq (without it: our "
                        "variants only, no ratios)")
    parser.add_argument("--deq", default="", help="optional: a checkout of github.com/locuslab/deq, whose "
                        "MDEQ-Vision is then timed too (variant locuslab_deq, a third baseline)")
    parser.add_argument("--zoo", default="", help="optional: a checkout of github.com/locuslab/torchdeq: its "
                        "deq-zoo MDEQ's phantom recipe is timed against ours in a second table")
    parser.add_argument("--f-thres", type=int, nargs="+", default=[10, 22, 30])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS),
                        help="our variants to time beside the original (default: all)")
    parser.add_argument("--device", default=str(DEVICE), choices=("cpu", "cuda"),
                        help="where every implementation runs (default: cuda when available)")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/compare_original.json"))
    parser.add_argument("--child", nargs=2, metavar=("WHICH", "F_THRES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        DEVICE = torch.device(args.device)
        which, f_thres = args.child[0], int(args.child[1])
        if which == "locuslab_deq":
            model, forward = build_deq_vision(args.deq, f_thres)
        elif which == "torchdeq_zoo":
            model, forward = build_zoo(args.zoo, f_thres)
        elif which in VARIANTS or which in PHANTOM_VARIANTS:
            model, forward = build_ours(f_thres, which)
        else:
            model, forward = build_original(args.mdeq, f_thres, retain=which == "original_retain")
        print(json.dumps(time_steps(model, forward, args.batch, args.steps)))
        return
    for flag, marker in (("mdeq", "lib/models/mdeq.py"), ("deq", "MDEQ-Vision/lib/models/mdeq.py"),
                         ("zoo", "deq-zoo/mdeq/mdeq_cifar/mdeq/models/mdeq.py")):
        if getattr(args, flag) and not (Path(getattr(args, flag)) / marker).is_file():
            sys.exit(f"error: --{flag} {getattr(args, flag)} is not the expected checkout (no {marker})")
    # Baselines: the original as shipped, the original with our allocator setting, locuslab/deq's MDEQ-Vision.
    baselines = [*(ORIGINALS if args.mdeq else ()), *(["locuslab_deq"] if args.deq else [])]
    rows = compare(args, [*baselines, *args.variants], baselines)
    phantom = []
    if args.zoo:
        print("\nphantom-gradient recipe against the torchdeq zoo's (deq-zoo/mdeq/mdeq_cifar, run_small.sh)")
        phantom = compare(args, ["torchdeq_zoo", *PHANTOM_VARIANTS], ["torchdeq_zoo"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "phantom_rows": phantom, "device": args.device,
                                          "torch": torch.__version__}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
