"""MDEQ-TINY training-step speed and memory per gradient mode (ift / phantom / unrolled) and forward budget.

    python benchmarks/train_step.py [--steps 5] [--batch 32] [--f-thres 10 20 30] [--f-solver broyden]
                                    [--out benchmarks/results/train_step.json]
    python benchmarks/train_step.py --compare-original /path/to/mdeq [compare_original.py's flags]

``--compare-original`` hands over to ``compare_original.py`` (the step side by side with locuslab/mdeq, and
optionally locuslab/deq and the torchdeq zoo, imported from the user's checkouts).

Each (mode, F_THRES) runs in a fresh process so that memory peaks do not mix. The forward tolerance is set
to 0 so every solve spends its whole budget: otherwise an early stop would hide how memory scales.
Memory is reported two ways: the bytes autograd saves for backward during one step (exact, what the
gradient mode decides) and the step's peak memory, the largest over the timed steps (CUDA:
``max_memory_allocated`` above the memory allocated before; CPU (Linux): the resident high-water mark above
the RSS before the step, after returning freed heap to the OS with ``malloc_trim`` and resetting the mark
through ``/proc/self/clear_refs``, so that allocator leftovers from earlier steps do not count). It includes
transient buffers: the solvers' workspaces, the backward solve, the gradients.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
MODES = ("ift", "phantom", "unrolled")


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def reset_cpu_peak() -> float:
    """Release freed heap, reset the resident high-water mark and return the RSS now (MB)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return rss_mb()


def cpu_peak_mb() -> float:
    """The resident high-water mark since the last reset (MB)."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024


def reset_peak(dev: torch.device) -> float:
    """Start a per-step peak measurement; return the memory in use now (MB)."""
    if dev.type != "cuda":
        return reset_cpu_peak()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated() / 2**20


def peak(dev: torch.device) -> float:
    """The peak memory since :func:`reset_peak` (MB)."""
    if dev.type != "cuda":
        return cpu_peak_mb()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def measure_steps(loss_and_info: Callable[[], tuple[torch.Tensor, dict]], optimizer: torch.optim.Optimizer,
                  dev: torch.device, steps: int) -> dict:
    """One warm-up training step that records what autograd saves, then ``steps`` timed ones with their
    peaks. ``loss_and_info()`` runs the forward and the loss. Returns the last ``info``, the median step time,
    the saved-for-backward and the largest per-step peak memory (MB)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def step(record: bool = False) -> dict:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if record else torch.enable_grad():
            loss, info = loss_and_info()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return info

    info = step(record=True)
    times, peaks = [], []
    for _ in range(steps):
        base = reset_peak(dev)
        start = time.perf_counter()
        info = step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        peaks.append(peak(dev) - base)
    return {"info": info, "step_s": statistics.median(times), "saved_for_backward_mb": sum(storages.values()) / 2**20,
            "peak_step_mb": max(peaks)}


def measure(mode: str, f_thres: int, batch: int, steps: int, device: str, f_solver: str) -> dict:
    """Time ``steps`` training steps of MDEQ-TINY (after one warm-up) and measure their memory."""
    from deqlab.config import load_config
    from deqlab.models import build_model

    cfg = load_config(REPO / "experiments/cifar/cls_mdeq_TINY.yaml",
                      ["DEQ.GRAD", mode, "DEQ.F_SOLVER", f_solver, "DEQ.F_THRES", str(f_thres), "DEQ.F_EPS", "0.0", "TRAIN.PRETRAIN_STEPS", "0",
                       "MODEL.DROPOUT", "0.0"])
    torch.manual_seed(0)
    dev = torch.device(device)
    model = build_model(cfg).to(dev).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch, 3, 32, 32, device=dev), torch.randint(0, 10, (batch,), device=dev)

    def loss_and_info() -> tuple[torch.Tensor, dict]:
        logits, info = model(x, train_step=10**9)
        return F.cross_entropy(logits, y), info

    run = measure_steps(loss_and_info, optimizer, dev, steps)
    info = run["info"]
    return {"mode": mode, "f_solver": f_solver, "f_thres": f_thres, "batch": batch, "device": device,
            "step_s": run["step_s"], "images_per_s": batch / run["step_s"],
            "fwd_steps": info["fwd"]["nstep"], "fwd_nfe": info["fwd"]["nfe"],
            "bwd_steps": info["bwd"].get("nstep", 0), "bwd_nfe": info["bwd"].get("nfe", 0),
            "saved_for_backward_mb": run["saved_for_backward_mb"], "peak_step_mb": run["peak_step_mb"]}


def memory_growth(rows: list[dict], modes: list[str], f_thres: list[int]) -> tuple[dict, dict]:
    """Per mode, the relative growth of saved-for-backward and peak memory from the smallest to the largest
    F_THRES, printed; and the targets: flat (<= 10%) for ift/phantom, growing for unrolled."""
    lo, hi = min(f_thres), max(f_thres)
    growth = {}
    for mode in modes:
        by_thres = {r["f_thres"]: r for r in rows if r["mode"] == mode}
        growth[mode] = {k: by_thres[hi][k] / by_thres[lo][k] - 1 for k in ("saved_for_backward_mb", "peak_step_mb")}
        print(f"{mode}: memory growth F_THRES {lo} -> {hi}: saved {100 * growth[mode]['saved_for_backward_mb']:+.0f}%, "
              f"peak {100 * growth[mode]['peak_step_mb']:+.0f}%")
    targets = {m: all(g <= 0.10 for g in growth[m].values()) for m in ("ift", "phantom") if m in growth}
    if "unrolled" in growth and hi > lo:
        targets["unrolled grows"] = growth["unrolled"]["saved_for_backward_mb"] > 0.10
    print("targets:", ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in targets.items()))
    return growth, targets


def run_grid(script: str, modes: list[str], f_thres: list[int], rate_key: str, rate_label: str,
             child_args: list[str]) -> list[dict]:
    """Run ``script --child MODE F_THRES *child_args`` in a fresh process per setting (memory peaks must not
    mix), print one table row each (``rate_key`` is the throughput column) and return the rows."""
    rows = []
    print(f"{'mode':<10}{'F_THRES':>8}{rate_label:>12}{'fwd/bwd f evals':>17}{'saved MB':>10}{'peak MB':>9}")
    for mode in modes:
        for budget in f_thres:
            cmd = [sys.executable, script, "--child", mode, str(budget), *child_args]
            row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            rows.append(row)
            print(f"{mode:<10}{budget:>8}{row[rate_key]:>12.1f}{row['fwd_nfe']:>8}/{row['bwd_nfe']:<8}"
                  f"{row['saved_for_backward_mb']:>10.1f}{row['peak_step_mb']:>9.1f}", flush=True)
    return rows


def main() -> None:
    if "--compare-original" in sys.argv:  # the side-by-side comparison lives in compare_original.py
        at = sys.argv.index("--compare-original")
        rest = sys.argv[1:at] + sys.argv[at + 2:]
        script = str(Path(__file__).with_name("compare_original.py"))
        raise SystemExit(subprocess.call([sys.executable, script, "--mdeq", *sys.argv[at + 1:at + 2], *rest]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--f-thres", type=int, nargs="+", default=[10, 20, 30])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--f-solver", default="broyden", help="forward solver (MDEQ-TINY's is broyden)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/train_step.json"))
    parser.add_argument("--compare-original", metavar="MDEQ_CHECKOUT",
                        help="run compare_original.py --mdeq MDEQ_CHECKOUT with the other flags instead")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "F_THRES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.batch, args.steps, args.device,
                                 args.f_solver)))
        return

    rows = run_grid(__file__, args.modes, args.f_thres, "images_per_s", "images/s",
                    ["--batch", str(args.batch), "--steps", str(args.steps), "--device", args.device,
                     "--f-solver", args.f_solver])
    growth, targets = memory_growth(rows, args.modes, args.f_thres)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"f_solver": args.f_solver, "rows": rows, "growth": growth, "targets": targets,
                                          "torch": torch.__version__}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
