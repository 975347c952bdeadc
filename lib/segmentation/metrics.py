"""Segmentation metrics from a confusion matrix: IoU per class, mIoU, pixel accuracy, mean class accuracy.

Confusion matrices are plain sums, so per-batch (and per-rank) matrices add up to the dataset's.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def confusion_matrix(pred: Tensor, label: Tensor, num_classes: int, ignore_label: int) -> Tensor:
    """(C, C) int64 counts on ``pred``'s device, rows = ground truth, columns = prediction, over the pixels
    whose label is not ``ignore_label``. ``pred``: class ids shaped like ``label``, or logits (B, C, H, W)
    at the label's resolution (their argmax over dim 1 is taken)."""
    if pred.dim() == label.dim() + 1:
        pred = pred.argmax(dim=1)
    if pred.shape != label.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
    valid = label != ignore_label
    gt, pr = label[valid].long(), pred[valid].long()
    # A label outside [0, C) would land in another cell of the flattened matrix (or outside it).
    if gt.numel() and not bool(((gt >= 0) & (gt < num_classes)).all()):
        raise ValueError(f"labels must lie in [0, {num_classes}) or equal the ignore label {ignore_label}")
    counts = torch.bincount(gt * num_classes + pr, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes)


def segmentation_scores(conf: Tensor) -> dict[str, Any]:
    """Scores (fractions in [0, 1]) of a (C, C) confusion matrix (rows = ground truth):

    - ``iou``: per-class IoU = tp / (gt + pred - tp); nan for a class absent from both gt and prediction;
    - ``miou``: mean IoU over the classes present in gt or prediction (the original averaged over all C
      classes, counting an absent class as 0: the same number whenever every class occurs);
    - ``pixel_acc``: correctly labelled pixels / labelled pixels;
    - ``mean_acc``: mean over the classes present in gt of tp / gt.
    Empty matrices give 0 for the means."""
    conf = conf.double().cpu()
    tp, gt, pred = conf.diag(), conf.sum(1), conf.sum(0)
    union = gt + pred - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    present = union > 0
    in_gt = gt > 0
    total = gt.sum()
    return {
        "miou": float(iou[present].mean()) if present.any() else 0.0,
        "iou": iou.tolist(),
        "pixel_acc": float(tp.sum() / total) if total > 0 else 0.0,
        "mean_acc": float((tp[in_gt] / gt[in_gt]).mean()) if in_gt.any() else 0.0,
    }
