"""Test an MDEQ segmenter: ``python tools/seg_test.py --cfg FILE TEST.MODEL_FILE ckpt.pth [KEY VALUE ...]``.

Sliding-window inference over full images (``TEST.IMAGE_SIZE`` windows on the image resized to
``TEST.BASE_SIZE``), ``TEST.MULTI_SCALE`` / ``TEST.FLIP_TEST`` as the original; prints mIoU, per-class IoU and
pixel accuracy over every rank's images. ``--results_name FILE.csv`` appends one row (a test-time
``DEQ.F_THRES`` sweep). ``--save_pred DIR`` writes each prediction as ``DIR/<image name>.png``, a palette PNG of
the values the dataset's label files use (``DATASET.LABEL_MAPPING cityscapes``: Cityscapes label ids, the
test server's format; ``none``: class ids), and as a colour PNG in ``DIR/colour/``; ``--save_panels N`` adds
``DIR/panels/``: image | ground truth | prediction | errors (red) of the first N images
(``deqlab.utils.seg_pictures``).

Example::

    python tools/seg_test.py --save_pred preds/ --save_panels 4 \\
        --cfg experiments/fashion_scenes/seg_mdeq_quickstart.yaml \\
        TEST.MODEL_FILE output/fashion_scenes/seg_mdeq_quickstart/final_state.pth
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from deqlab.engine.cli import run_tool
from deqlab.engine.launch import check_output, test_main
from deqlab.errors import ConfigError
from deqlab.utils.seg_pictures import class_colours, colourise, label_png, panel


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--save_pred", default="", metavar="DIR",
                        help="write label PNGs (Cityscapes: label ids, the test server's format) and colour/ PNGs")
    parser.add_argument("--save_panels", type=int, default=0, metavar="N",
                        help="also write panels/: image | ground truth | prediction | errors of the first N images")


def prediction_saver(args: argparse.Namespace, cfg: Any, loader: Any) -> Callable[[int, torch.Tensor], None] | None:
    """Saves batch ``i``'s predictions under the names of its images (the test loader is not shuffled)."""
    if args.save_panels < 0 or (args.save_panels and not args.save_pred):
        raise ConfigError(f"--save_panels N needs N >= 0 and --save_pred DIR (the panels go to DIR/panels), got "
                          f"{args.save_panels}{'' if args.save_pred else ' without --save_pred'}")
    if not args.save_pred:
        return None
    out = Path(args.save_pred)
    check_output(out, "--save_pred", folder=True)  # before the evaluation, not at its first batch
    for sub in ("colour", "panels") if args.save_panels else ("colour",):
        (out / sub).mkdir(parents=True, exist_ok=True)
    order = list(loader.sampler)  # this rank's shard, in order
    batch, mapping = loader.batch_size, str(cfg.DATASET.LABEL_MAPPING).lower()
    colours, ignore = class_colours(mapping), int(cfg.TRAIN.IGNORE_LABEL)

    def save(i: int, output: torch.Tensor) -> None:
        for k, pred in enumerate(output.argmax(1).cpu().numpy(), i * batch):
            name = loader.dataset.files[order[k]].name
            label_png(pred, mapping).save(out / f"{name}.png")
            Image.fromarray(colourise(pred, colours)).save(out / "colour" / f"{name}.png")
            if k < args.save_panels:
                image, label = loader.dataset[order[k]]
                panel(image, label.numpy(), pred, colours, ignore).save(out / "panels" / f"{name}.png")

    return save


if __name__ == "__main__":
    run_tool(lambda: test_main("seg", __doc__, add_arguments=add_arguments,
                               batch_hook=prediction_saver))
