"""Test an MDEQ segmenter: ``python tools/seg_test.py --cfg FILE TEST.MODEL_FILE ckpt.pth [KEY VALUE ...]``.

Sliding-window inference over full images (``TEST.IMAGE_SIZE`` windows on the image resized to
``TEST.BASE_SIZE``), ``TEST.MULTI_SCALE`` / ``TEST.FLIP_TEST`` as the original; prints mIoU, per-class IoU and
pixel accuracy over every rank's images. ``--results_name FILE.csv`` appends one row (a test-time
``DEQ.F_THRES`` sweep); ``--save_pred DIR`` writes each prediction as a colour PNG.

Example::

    python tools/seg_test.py --cfg experiments/fashion_scenes/seg_mdeq_quickstart.yaml --save_pred preds/ \\
        TEST.MODEL_FILE output/fashion_scenes/seg_mdeq_quickstart/final_state.pth
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from deqlab.engine.cli import run_tool
from deqlab.engine.launch import check_output, test_main


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--save_pred", default="", metavar="DIR", help="write colour PNGs of the predictions here")


def palette(cfg: Any) -> list[int]:
    """Colours of the classes: Cityscapes' official ones (``cityscapesscripts``) for its train ids, else a
    fixed distinct colour per class (the PASCAL VOC bit pattern)."""
    if cfg.DATASET.LABEL_MAPPING == "cityscapes":
        from cityscapesscripts.helpers.labels import trainId2label
        colours = [trainId2label[i].color if i in trainId2label else (0, 0, 0) for i in range(256)]
    else:
        colours = []
        for i in range(256):
            rgb, bits = [0, 0, 0], i
            for shift in range(7, -1, -1):  # bits 0/1/2 of each octal digit -> the high bits of r/g/b
                for channel in range(3):
                    rgb[channel] |= ((bits >> channel) & 1) << shift
                bits >>= 3
            colours.append(tuple(rgb))
    return [c for rgb in colours for c in rgb]


def prediction_saver(args: argparse.Namespace, cfg: Any, loader: Any) -> Callable[[int, torch.Tensor], None] | None:
    """Saves batch ``i``'s predictions under the names of its images (the test loader is not shuffled)."""
    if not args.save_pred:
        return None
    out = Path(args.save_pred)
    check_output(out, "--save_pred", folder=True)  # before the evaluation, not at its first batch
    out.mkdir(parents=True, exist_ok=True)
    names = [loader.dataset.files[j].name for j in loader.sampler]  # this rank's shard, in order
    batch, colours = loader.batch_size, palette(cfg)

    def save(i: int, output: torch.Tensor) -> None:
        for name, pred in zip(names[i * batch:(i + 1) * batch], output.argmax(1).cpu()):
            image = Image.fromarray(pred.numpy().astype(np.uint8), mode="P")
            image.putpalette(colours)
            image.convert("RGB").save(out / f"{name}.png")

    return save


if __name__ == "__main__":
    run_tool(lambda: test_main("seg", __doc__, add_arguments=add_arguments,
                               batch_hook=prediction_saver))
