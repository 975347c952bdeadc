"""Test-time segmentation of whole images as locuslab/mdeq (HRNet's ``BaseDataset.multi_scale_inference``)
does it: per scale, resize, slide a window over the image, fuse, resize back, fuse the scales; optionally
average with the flipped image's prediction.

Fusion follows the original exactly: a window's prediction is ``exp`` of its (flip-averaged) logits;
overlapping windows are averaged and scales combined in that exp space. We return the log of the fused
values (so one window at one scale gives back the model's logits, and the argmax is the original's).
Images and fused probabilities are resized bilinearly with ``align_corners=False`` (OpenCV's ``INTER_LINEAR``,
as the original). The model's 1/4-resolution logits are upsampled to the window with ``align_corners=True``,
as the training loss and the original's validation do; the original's test code used ``F.upsample``'s
default (``False``) there, an inconsistency that cost 1.6 mIoU on the fashion_scenes quickstart model.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from deqlab.data.vision import IMAGENET_MEAN, IMAGENET_STD
from deqlab.deq import mean_spectral_radius
from deqlab.segmentation.losses import upsample_to
from deqlab.solvers.common import SolveSummary, mean_summary, solver_summary

# The multi-scale list of HRNet-Semantic-Segmentation's Cityscapes evaluation (TEST.SCALE_LIST).
ORIGINAL_TEST_SCALES: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
# Padding of windows that stick out of the image: a black pixel after ImageNet normalisation (the original's).
IMAGENET_BLACK: tuple[float, ...] = tuple(-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))


def resize_long_side(image: Tensor, long_side: int) -> Tensor:
    """``image`` (B, 3, H, W) resized so that its long side is ``long_side`` (the short side rounded)."""
    h, w = image.shape[-2:]
    size = (long_side, int(w * long_side / h + 0.5)) if h > w else (int(h * long_side / w + 0.5), long_side)
    return upsample_to(image, size, align_corners=False)


def pad_to(image: Tensor, height: int, width: int, value: Tensor) -> Tensor:
    """``image`` padded at the bottom and right with the per-channel ``value`` to at least (height, width)."""
    h, w = image.shape[-2:]
    if h >= height and w >= width:
        return image
    out = value.view(1, -1, 1, 1).to(image).expand(image.shape[0], -1, max(h, height), max(w, width)).clone()
    out[..., :h, :w] = image
    return out


def sliding_window(predict: Callable[[Tensor], Tensor], image: Tensor, crop_h: int, crop_w: int,
                   pad: Tensor) -> Tensor:
    """``predict`` over windows of (crop_h, crop_w) with a stride of 2/3 of the window, averaged where they
    overlap; windows at the border are padded to the full window. An image whose long side fits in the
    window's short side is predicted in one padded pass."""
    h, w = image.shape[-2:]
    if max(h, w) <= min(crop_h, crop_w):
        return predict(pad_to(image, crop_h, crop_w, pad))[..., :h, :w]
    image = pad_to(image, crop_h, crop_w, pad)
    full_h, full_w = image.shape[-2:]
    stride_h, stride_w = max(1, int(crop_h * 2 / 3)), max(1, int(crop_w * 2 / 3))
    rows = math.ceil((full_h - crop_h) / stride_h) + 1
    cols = math.ceil((full_w - crop_w) / stride_w) + 1
    total = count = None
    for r in range(rows):
        for c in range(cols):
            h0, w0 = r * stride_h, c * stride_w
            h1, w1 = min(h0 + crop_h, full_h), min(w0 + crop_w, full_w)
            out = predict(pad_to(image[..., h0:h1, w0:w1], crop_h, crop_w, pad))[..., :h1 - h0, :w1 - w0]
            if total is None:
                total = out.new_zeros(*out.shape[:2], full_h, full_w)
                count = out.new_zeros(1, 1, full_h, full_w)
            total[..., h0:h1, w0:w1] += out
            count[..., h0:h1, w0:w1] += 1
    return (total / count)[..., :h, :w]


@torch.no_grad()
def segment(model: nn.Module, image: Tensor, *, num_classes: int, crop_size: Sequence[int] | None,
            base_size: int | None, scales: Sequence[float] = (1.0,), flip: bool = False,
            f_thres: int | None = None, pad_value: Sequence[float] = IMAGENET_BLACK
            ) -> tuple[Tensor, SolveSummary, float | None]:
    """Logits (B, num_classes, H, W) of ``image`` (B, 3, H, W, normalised) at its own resolution, the mean
    forward solve summary (steps, f evaluations, final relative residual) over the model calls and their mean
    spectral radius (None when the model computes none).

    For each scale the image is resized so that its long side is ``round(base_size * scale)`` (``base_size``
    None: the image's own long side), predicted with sliding windows of ``crop_size`` = (width, height)
    (None: the whole resized image in one call), and resized back; the scales are averaged. ``flip``: every
    window's logits are averaged with those of its mirror image, mirrored back. ``model(x, train_step=-1,
    f_thres=f_thres)`` returns ``(logits at any resolution, info)``; logits are resized to the window."""
    if not scales:
        raise ValueError("scales is empty")
    height, width = image.shape[-2:]
    pad = torch.as_tensor(pad_value, dtype=image.dtype, device=image.device)
    summaries: list[SolveSummary] = []
    sradii: list[float] = []
    shift: Tensor | None = None  # per-sample constant keeping exp() in range; cancels in the log at the end

    def logits_of(x: Tensor) -> Tensor:
        out, info = model(x, train_step=-1, f_thres=f_thres)
        if out.shape[1] != num_classes:
            raise ValueError(f"the model predicts {out.shape[1]} classes, expected num_classes={num_classes}")
        summaries.append(solver_summary(info["fwd"]))
        if info.get("sradius") is not None:
            sradii.append(mean_spectral_radius(info))
        return upsample_to(out.float(), x.shape[-2:], align_corners=True)  # as trained (see the docstring)

    def predict(x: Tensor) -> Tensor:
        nonlocal shift
        logits = logits_of(x)
        if flip:
            logits = (logits + logits_of(x.flip(-1)).flip(-1)) / 2
        logits = logits.double()
        if shift is None:
            shift = logits.amax(dim=(1, 2, 3), keepdim=True)
        return (logits - shift).exp()

    fused = None
    for scale in scales:
        long_side = int((base_size or max(height, width)) * scale + 0.5)
        x = resize_long_side(image, long_side)
        probs = predict(x) if crop_size is None else sliding_window(predict, x, crop_size[1], crop_size[0], pad)
        probs = upsample_to(probs, (height, width), align_corners=False)
        fused = probs if fused is None else fused + probs
    logits = (fused / len(scales)).log() + shift
    return logits.float(), mean_summary(summaries), sum(sradii) / len(sradii) if sradii else None
