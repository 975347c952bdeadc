"""The segmentation losses of locuslab/mdeq (from HRNet): cross-entropy with an ignore label and class weights,
and online hard example mining (OHEM). Both take logits ``(B, C, h, w)`` at any resolution and labels
``(B, H, W)`` (int64) and first upsample the logits bilinearly to ``(H, W)`` with ``align_corners=True``, as the
original's criterion does.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The original's Cityscapes class weights (trainId order: road, sidewalk, ..., bicycle).
CITYSCAPES_CLASS_WEIGHTS: tuple[float, ...] = (
    0.8373, 0.918, 0.866, 1.0345, 1.0166, 0.9969, 0.9754, 1.0489, 0.8786, 1.0023,
    0.9539, 0.9843, 1.1116, 0.9037, 1.0865, 1.0955, 1.0865, 1.1529, 1.0507)


def upsample_to(logits: Tensor, size: Sequence[int], align_corners: bool) -> Tensor:
    """Bilinear resize of ``logits`` (B, C, h, w) to ``size`` (H, W); a no-op when the size already fits."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=align_corners)


class CrossEntropy(nn.Module):
    """Mean (class-weighted) cross-entropy over the pixels whose label is not ``ignore_label``.

    A batch without a single valid pixel gives 0 (still part of the graph) instead of torch's nan, so one
    fully ignored crop cannot poison training or leave a DDP rank without gradients."""

    def __init__(self, ignore_label: int = 255, weight: Sequence[float] | Tensor | None = None) -> None:
        super().__init__()
        self.ignore_label = ignore_label
        # Not persistent: the weights are a constant of the dataset, not a model parameter (the original's
        # checkpoints carried ``loss.criterion.weight``; ours do not).
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32),
                             persistent=False)

    def upsampled(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The logits in float32 at the labels' resolution."""
        return upsample_to(logits.float(), labels.shape[-2:], align_corners=True)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        logits = self.upsampled(logits, labels)
        if not bool((labels != self.ignore_label).any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits, labels, weight=self.weight, ignore_index=self.ignore_label)


class OhemCrossEntropy(CrossEntropy):
    """Cross-entropy over the hard pixels only (the original's OHEM rule).

    With ``p`` the softmax probability of each valid pixel's true class sorted ascending and ``n`` the number
    of valid pixels, the threshold is ``max(p[min(min_kept, n - 1)], thres)``; the loss is the plain mean of
    the (class-weighted) per-pixel losses of the pixels with probability below it. Ignored pixels never count.
    When no pixel is kept (none valid, or all tied at the threshold) the loss is 0 (the original gave nan or
    raised IndexError)."""

    def __init__(self, ignore_label: int = 255, thres: float = 0.7, min_kept: int = 100000,
                 weight: Sequence[float] | Tensor | None = None) -> None:
        super().__init__(ignore_label, weight)
        self.thres = thres
        self.min_kept = max(1, min_kept)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        logits = self.upsampled(logits, labels)
        valid = labels != self.ignore_label
        losses = F.cross_entropy(logits, labels, weight=self.weight, ignore_index=self.ignore_label,
                                 reduction="none")[valid]
        if losses.numel() == 0:
            return logits.sum() * 0.0
        with torch.no_grad():  # the selection is not differentiated (the original sorted detached values)
            prob = logits.softmax(dim=1).gather(1, labels.where(valid, 0).unsqueeze(1)).squeeze(1)[valid]
            k = min(self.min_kept, prob.numel() - 1)
            threshold = max(prob.kthvalue(k + 1).values.item(), self.thres)  # kthvalue counts from 1
        kept = losses[prob < threshold]
        return kept.mean() if kept.numel() else logits.sum() * 0.0


def build_seg_criterion(cfg: Any) -> CrossEntropy:
    """The training loss of a segmentation config: OHEM when ``LOSS.USE_OHEM`` (``OHEMTHRES``, ``OHEMKEEP``),
    plain cross-entropy otherwise; ignore label ``TRAIN.IGNORE_LABEL``. Class weights are the original's
    Cityscapes weights when ``DATASET.NUM_CLASSES == 19`` and ``DATASET.LABEL_MAPPING == "cityscapes"``;
    every other dataset (e.g. fashion_scenes) is unweighted."""
    cityscapes = cfg.DATASET.NUM_CLASSES == 19 and cfg.DATASET.LABEL_MAPPING == "cityscapes"
    weight = CITYSCAPES_CLASS_WEIGHTS if cityscapes else None
    if cfg.LOSS.USE_OHEM:
        return OhemCrossEntropy(cfg.TRAIN.IGNORE_LABEL, cfg.LOSS.OHEMTHRES, cfg.LOSS.OHEMKEEP, weight)
    return CrossEntropy(cfg.TRAIN.IGNORE_LABEL, weight)
