"""Losses: the fixed-point correction of DEQ training, and the segmentation losses of locuslab/mdeq.

Fixed-point correction (Geng et al., NeurIPS 2021; torchdeq's ``fp_correction``): the task loss applied to a
sequence of states converging to the fixed point, e.g. the phantom-gradient iterates z_1 .. z_n, combined
with weights w_k that grow towards the last state (``fixed_point_correction``). A model returns the outputs
of those states as a :class:`Trajectory`; the classification and segmentation tasks apply the correction.

Segmentation (from HRNet): cross-entropy with an ignore label and class weights, and online hard example
mining (OHEM). Both take logits ``(B, C, h, w)`` at any resolution and labels ``(B, H, W)`` (int64) and first
upsample the logits bilinearly to ``(H, W)`` with ``align_corners=True``, as the original's criterion does.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FPC_WEIGHTS = ("const", "linear", "exp")


def fpc_weights(n: int, weights: str = "exp", gamma: float = 0.8) -> list[float]:
    """The weights w_0 .. w_{n-1} of :func:`fixed_point_correction` (k = n − 1 is the last state):

    - ``exp``:    w_k = γ^(n − k − 1)                       (torchdeq's default; the last state weighs 1)
    - ``linear``: w_k = 1 − (n − k − 1) / n · γ            (torchdeq's ``_linear`` with bias 0)
    - ``const``:  w_k = 1

    torchdeq's ``const`` returns a length-n tensor of ones per term (a vector loss, and it rejects the
    ``gamma`` its caller passes); the intended weight 1 is what is used here.
    """
    if n < 1:
        raise ValueError(f"fixed-point correction needs at least one loss, got {n}")
    if weights == "exp":
        return [gamma ** (n - k - 1) for k in range(n)]
    if weights == "linear":
        return [1.0 - (n - k - 1) / n * gamma for k in range(n)]
    if weights == "const":
        return [1.0] * n
    raise ValueError(f"unknown fixed-point correction weights {weights!r}; expected one of {', '.join(FPC_WEIGHTS)}")


def fixed_point_correction(losses: Sequence[Tensor], weights: str = "exp", gamma: float = 0.8) -> Tensor:
    """Σ_k w_k · losses[k] for the losses of states ordered towards the fixed point (weights: :func:`fpc_weights`).

    The same combination as torchdeq's ``fp_correction(crit, (outputs, target), weight_func=weights,
    gamma=gamma)`` given ``losses[k] = crit(outputs[k], target)``; one loss gives that loss unchanged.
    """
    return sum(w * loss for w, loss in zip(fpc_weights(len(losses), weights, gamma), losses))


class Trajectory(list):
    """A model's outputs for a sequence of states (training with the fixed-point correction), last = the
    model's output at the equilibrium. A task's ``loss`` applies the correction to all of them; code that
    only wants the output reads ``[-1]``, and ``detach()`` gives the last output detached (what the engine's
    per-step statistics take)."""

    def detach(self) -> Tensor:
        return self[-1].detach()


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
