"""MDEQ-SMALL segmentation training-step speed and memory per gradient mode and forward budget.

    python benchmarks/seg_step.py [--steps 2] [--batch 2] [--crop 512 256] [--f-thres 10 20 30]
                                  [--modes ift phantom unrolled] [--out benchmarks/results/seg_step.json]

The structure of ``train_step.py`` (same memory measures, see its docstring) for the Cityscapes model:
``experiments/cityscapes/seg_mdeq_SMALL.yaml`` as shipped (Broyden forward and backward, ``B_THRES`` 30, SGD
with its LR/momentum/WD) on a ``--crop`` [width, height] random image with random labels, and that config's
training loss (``deqlab.segmentation.losses.build_seg_criterion``: logits upsampled to the label size, class-weighted
cross-entropy, ignore label 255). Dropout is off and the forward tolerance 0, so every solve spends its whole
``F_THRES`` budget. Each (mode, F_THRES) runs in a fresh process.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from train_step import MODES, REPO, measure_steps, memory_growth, run_grid

CONFIG = REPO / "experiments/cityscapes/seg_mdeq_SMALL.yaml"


def measure(mode: str, f_thres: int, batch: int, crop: list[int], steps: int, device: str) -> dict:
    """Time ``steps`` training steps of MDEQ-SMALL seg (after one warm-up) and measure their memory."""
    from deqlab.config import load_config
    from deqlab.segmentation.losses import build_seg_criterion
    from deqlab.models import build_model

    width, height = crop
    cfg = load_config(CONFIG, ["DEQ.GRAD", mode, "DEQ.F_THRES", str(f_thres), "DEQ.F_EPS", "0.0",
                               "TRAIN.PRETRAIN_STEPS", "0", "MODEL.DROPOUT", "0.0", "TRAIN.IMAGE_SIZE", str(crop)])
    torch.manual_seed(0)
    dev = torch.device(device)
    model = build_model(cfg, task="seg").to(dev).train()
    criterion = build_seg_criterion(cfg).to(dev)
    train = cfg.TRAIN
    optimizer = torch.optim.SGD(model.parameters(), lr=train.LR, momentum=train.MOMENTUM, weight_decay=train.WD)
    x = torch.randn(batch, 3, height, width, device=dev)
    labels = torch.randint(0, cfg.DATASET.NUM_CLASSES, (batch, height, width), device=dev)
    labels[:, :, : width // 8] = train.IGNORE_LABEL  # a band of ignored pixels, as Cityscapes has

    def loss_and_info() -> tuple[torch.Tensor, dict]:
        logits, info = model(x, train_step=10**9)
        return criterion(logits, labels), info

    run = measure_steps(loss_and_info, optimizer, dev, steps)
    info = run["info"]
    return {"mode": mode, "f_thres": f_thres, "batch": batch, "crop": crop, "device": device,
            "step_s": run["step_s"], "fwd_steps": info["fwd"]["nstep"], "fwd_nfe": info["fwd"]["nfe"],
            "bwd_steps": info["bwd"].get("nstep", 0), "bwd_nfe": info["bwd"].get("nfe", 0),
            "saved_for_backward_mb": run["saved_for_backward_mb"],
            "peak_step_mb": run["peak_step_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per setting (after one warm-up)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--crop", type=int, nargs=2, default=[512, 256], metavar=("W", "H"))
    parser.add_argument("--f-thres", type=int, nargs="+", default=[10, 20, 30])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/seg_step.json"))
    parser.add_argument("--child", nargs=2, metavar=("MODE", "F_THRES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.batch, args.crop, args.steps, args.device)))
        return

    rows = run_grid(__file__, args.modes, args.f_thres, "step_s", "step s",
                    ["--batch", str(args.batch), "--crop", *map(str, args.crop), "--steps", str(args.steps),
                     "--device", args.device])
    growth, targets = memory_growth(rows, args.modes, args.f_thres)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": str(CONFIG.relative_to(REPO)), "rows": rows, "growth": growth,
                                          "targets": targets, "torch": torch.__version__}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
