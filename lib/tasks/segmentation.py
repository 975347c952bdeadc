"""Semantic segmentation (MDEQ on Cityscapes, and the embedded Fashion-MNIST scenes).

Training: logits at 1/4 resolution, upsampled inside the loss (weighted cross-entropy or OHEM, ignore label).
Validation during training: one whole-image forward per image. ``tools/seg_test.py`` (``full_test``):
sliding windows of ``TEST.IMAGE_SIZE`` over the image resized to ``TEST.BASE_SIZE``, optionally several
scales (``TEST.MULTI_SCALE``) and flipping (``TEST.FLIP_TEST``). Metrics: mIoU, per-class IoU, pixel accuracy
from a confusion matrix summed over ranks. With ``LOSS.FPC`` the training objective (``deqlab.objective``) takes
the fixed-point correction of the losses of the model's outputs, one per phantom iterate.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from deqlab.segmentation.inference import ORIGINAL_TEST_SCALES, segment
from deqlab.segmentation.losses import build_seg_criterion, upsample_to
from deqlab.segmentation.metrics import confusion_matrix, segmentation_scores
from deqlab.solvers.common import SolveSummary
from deqlab.tasks.base import Meter, Task


def logits_at(output: Tensor, size: tuple[int, int]) -> Tensor:
    """Logits upsampled to the label's size as the loss and the original's validation do (align_corners)."""
    return upsample_to(output, size, align_corners=True)


class ConfusionMeter(Meter):
    """A (C, C) confusion matrix (rows: ground truth, columns: prediction) over every labelled pixel."""

    def __init__(self, num_classes: int, ignore_label: int, device: torch.device) -> None:
        super().__init__(num_classes * num_classes, device)
        self.num_classes, self.ignore_label = num_classes, ignore_label

    def update(self, output: Tensor, target: Tensor) -> None:
        pred = logits_at(output, target.shape[-2:]).argmax(1)
        self.sums += confusion_matrix(pred, target, self.num_classes, self.ignore_label).flatten().to(self.sums)

    def compute(self, sums: Tensor) -> dict[str, Any]:
        scores = segmentation_scores(sums.view(self.num_classes, self.num_classes))
        return {"miou": 100 * scores["miou"], "pixel_acc": 100 * scores["pixel_acc"],
                "mean_acc": 100 * scores["mean_acc"], "per_class_iou": [100 * v for v in scores["iou"]]}


class SegmentationTask(Task):
    name = "seg"
    best_metric = "miou"
    perf_label = "mIoU (%)"
    # An ImageNet classifier's backbone transfers; its classification head does not exist here.
    pretrained_exclude = ("classifier.", "incre_modules.", "downsamp_modules.", "final_layer.")
    sync_batchnorm = True

    def __init__(self, cfg: Any, full_test: bool = False) -> None:
        super().__init__(cfg, full_test)
        self.criterion: nn.Module = build_seg_criterion(cfg)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        self.criterion = self.criterion.to(output.device)
        return self.criterion(output.float(), target)

    def train_stats(self, output: Tensor, target: Tensor) -> dict[str, float]:
        pred = logits_at(output, target.shape[-2:]).argmax(1)
        valid = target != self.cfg.TRAIN.IGNORE_LABEL
        return {"pixel_acc": 100 * ((pred == target) & valid).sum().item() / max(valid.sum().item(), 1)}

    def predict(self, model: nn.Module, x: Tensor, f_thres: int | None, train_step: int = -1
                ) -> tuple[Tensor, SolveSummary, float | None]:
        if not self.full_test:
            return super().predict(model, x, f_thres)
        t = self.cfg.TEST
        return segment(model, x, num_classes=self.cfg.DATASET.NUM_CLASSES, crop_size=tuple(t.IMAGE_SIZE),
                       base_size=t.BASE_SIZE, scales=ORIGINAL_TEST_SCALES if t.MULTI_SCALE else (1.0,),
                       flip=t.FLIP_TEST, f_thres=f_thres)

    def new_meter(self, device: torch.device) -> Meter:
        return ConfusionMeter(self.cfg.DATASET.NUM_CLASSES, self.cfg.TRAIN.IGNORE_LABEL, device)

    def describe(self, metrics: dict[str, Any]) -> str:
        return (f"loss {metrics['loss']:.4f} mIoU {metrics['miou']:.2f} pixel acc {metrics['pixel_acc']:.2f} "
                f"mean acc {metrics['mean_acc']:.2f}")
