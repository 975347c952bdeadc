"""The GPU acceptance run: every CUDA path of deqlab checked against a reference, then timed.

    python benchmarks/gpu_check.py [--device auto|cuda|cpu] [--full] [--mdeq DIR [--deq DIR] [--zoo DIR]]
                                   [--out benchmarks/results/gpu_check.json]

Checks, each a row (pass / fail / n/a with its reason, the measured value, the tolerance):

- ``amp/TASK/MODE/DTYPE``: a training step of the cls, seg and lm quickstart models for DEQ.GRAD ift, phantom and
  unrolled under deqlab's AMP (float16 with its GradScaler, bfloat16): finite loss, gradient within a few rounding
  floors of the fp32 gradient at the same weights (after 5 fp32 warm-up steps); ``gpu_check_steps.py`` says why.
- ``channels_last/TASK``, ``compile/TASK``: MODEL.CHANNELS_LAST True / MODEL.COMPILE True against NCHW eager,
  same outputs and gradients to float32 round-off.
- ``syncbn/seg``: a seg step with SyncBatchNorm under DDP (NCCL, one process) equals the BatchNorm step (CUDA).
- ``dist/BACKEND/N``: an all_reduce through gloo, and NCCL (CUDA), with one process and with two (NCCL: two GPUs).
- ``dali/...``: DALI's mixed (nvJPEG) decoder against its CPU decoder on the same JPEGs and recordIO (CUDA), and
  recordIO against its JPEGs through the CPU decoder.
- ``timing/VARIANT``: deqlab's own MDEQ-TINY train and eval steps per speed variant (``compare_original.py``), and
  the originals beside them when their checkouts are given (``--mdeq``, ``--deq``, ``--zoo``).

On CUDA (the default where available) it takes a few minutes; without CUDA it runs the CPU paths (CPU autocast
in both dtypes, gloo, DALI's CPU decoder) in about two minutes and reports the CUDA-only checks n/a. The fp32
references run with TF32 off. Writes the rows as JSON to ``--out`` and prints them as a table; exit status 1 if
any check fails.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from gpu_check_common import row
from gpu_check_dali import dali_checks
from gpu_check_dist import group_checks, syncbn_check
from gpu_check_steps import amp_checks, switch_checks

REPO = Path(__file__).resolve().parents[1]
# Checks that need CUDA: n/a without it, never passed.
CUDA_ONLY = {"syncbn/seg", "dist/nccl/1", "dist/nccl/2", "dali/mixed_vs_cpu/jpeg", "dali/mixed_vs_cpu/rec"}
# compare_original.py's settings: its defaults on CUDA; on the CPU a short budget, no compile (cold: 15-30 s each).
TIMING = {"cuda": ["--f-thres", "10", "22", "30", "--batch", "32", "--steps", "3"],
          "cpu": ["--f-thres", "4", "--batch", "8", "--steps", "1", "--variants", "ours", "ours_nchw"]}


def timing_rows(device: torch.device, originals: list[str], out: Path) -> tuple[list[dict], str]:
    """deqlab's train/eval step variants (and the originals, if given) through ``compare_original.py``."""
    json_out = out.with_name(out.stem + "_timing.json")
    cmd = [sys.executable, str(REPO / "benchmarks/compare_original.py"), *originals, "--device", device.type,
           "--out", str(json_out), *TIMING[device.type]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    status = "originals given: " + " ".join(originals) if originals else "originals not given"
    if proc.returncode:
        return [row("timing/ours", device.type, "fail", reason=(proc.stderr or proc.stdout).strip()[-300:])], status
    rows = []
    for r in json.loads(json_out.read_text())["rows"]:
        ratios = {k: round(v, 3) for k, v in r.items() if "_ratio_" in k}
        rows.append(row(f"timing/{r['variant']}/t{r['f_thres']}", device.type, "pass",
                        {"train_s": round(r["train_s"], 4), "eval_s": round(r["eval_s"], 4), **ratios}, None,
                        f"MDEQ-TINY batch {r['batch']}, median step"))
    if not originals:
        rows.append(row("timing/originals", device.type, "n/a",
                        reason="originals not given (--mdeq DIR [--deq DIR] [--zoo DIR])"))
    return rows, status


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return " ".join(f"{k}={fmt(v)}" for k, v in value.items())
    return "" if value is None else str(value)


def print_table(rows: list[dict]) -> None:
    print(f"{'check':<30} {'device':<6} {'status':<6} {'value':>10} {'tolerance':>10}  reason")
    for r in rows:
        print(f"{r['check']:<30} {r['device']:<6} {r['status']:<6} {fmt(r['value']):>10} {fmt(r['tolerance']):>10}  "
              f"{r['reason']}")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("pass", "fail", "n/a")}
    print(", ".join(f"{n} {s}" for s, n in counts.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--full", action="store_true", help="on the CPU, also the cold compiles the budget skips")
    for flag in ("mdeq", "deq", "zoo"):
        parser.add_argument(f"--{flag}", default="", help=f"optional: a checkout of the original ({flag}) to time "
                            "beside ours (compare_original.py)")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/gpu_check.json"))
    args = parser.parse_args()
    name = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    device = torch.device(name)
    # the references are fp32: TF32 convolutions and matmuls would round them to 10 mantissa bits
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start, rows, seconds = time.perf_counter(), [], {}
    sections = {"amp": lambda: amp_checks(device), "switches": lambda: switch_checks(device, args.full),
                "syncbn": lambda: [syncbn_check(device)], "dist": lambda: group_checks(device),
                "dali": lambda: dali_checks(device)}
    for section, run in sections.items():
        t = time.perf_counter()
        rows += run()
        seconds[section] = round(time.perf_counter() - t, 1)
        print(f"{section}: {seconds[section]} s", file=sys.stderr, flush=True)
    originals = [item for flag in ("mdeq", "deq", "zoo") if getattr(args, flag)
                 for item in (f"--{flag}", getattr(args, flag))]
    t = time.perf_counter()
    timing, originals_status = timing_rows(device, originals, out)
    rows += timing
    seconds["timing"] = round(time.perf_counter() - t, 1)
    print_table(rows)
    total = round(time.perf_counter() - start, 1)
    out.write_text(json.dumps({
        "device": device.type, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
        platform.processor() or platform.machine(), "torch": torch.__version__, "seconds": total,
        "section_seconds": seconds, "originals": originals_status, "cuda_only": sorted(CUDA_ONLY), "rows": rows},
        indent=2))
    print(f"{total} s; wrote {out}")
    sys.exit(1 if any(r["status"] == "fail" for r in rows) else 0)


if __name__ == "__main__":
    main()
