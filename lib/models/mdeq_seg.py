"""MDEQ semantic segmenter: the MDEQ backbone and the segmentation head of locuslab/mdeq (``get_seg_net``).

Head: every branch's equilibrium state is upsampled bilinearly (``align_corners=True``, as the original) to
branch 0's resolution, 1/4 of the input with ``DOWNSAMPLE_TIMES`` 2; the states are concatenated and
``last_layer`` (1x1 conv, BatchNorm, ReLU, ``FINAL_CONV_KERNEL`` conv) maps them to ``DATASET.NUM_CLASSES``
logits at that resolution. The loss and the metrics upsample the logits to the label size themselves.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deqlab.models.mdeq_core import MDEQBackbone, check_resolutions

# The original builds the segmenter with BatchNorm momentum 0.01 everywhere (stem, stage0, head), against
# 0.1 for the classifier: Cityscapes batches are small, so the running statistics move slowly.
SEG_BN_MOMENTUM = 0.01


class MDEQSegNet(MDEQBackbone):
    """``logits, info = model(x, train_step=-1, compute_jac_loss=False, f_thres=None)``.

    ``x`` (B, C, H, W) → ``logits`` (B, NUM_CLASSES, H/4, W/4) for ``DOWNSAMPLE_TIMES`` 2; ``info`` as for
    the classifier (see docs/CONTRACTS.md; ``mdeq_core`` for ``MODEL.SKIP`` and ``LOSS.FPC``).
    """

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg, in_channels=cfg.MODEL.IN_CHANNELS)
        for key in ("TRAIN.IMAGE_SIZE", "TEST.IMAGE_SIZE"):  # crops and test windows must fuse evenly
            section, leaf = key.split(".")
            check_resolutions(cfg[section][leaf], cfg.MODEL.DOWNSAMPLE_TIMES, len(self.num_channels), key)
        width = sum(self.num_channels)
        kernel = cfg.MODEL.EXTRA.FINAL_CONV_KERNEL
        self.last_layer = nn.Sequential(
            nn.Conv2d(width, width, kernel_size=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, cfg.DATASET.NUM_CLASSES, kernel_size=kernel, padding=kernel // 2))
        for mod in self.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.momentum = SEG_BN_MOMENTUM
        self.init_weights()

    def head(self, z: list[Tensor]) -> Tensor:
        """Per-pixel logits at branch 0's resolution from the list of branch states."""
        size = z[0].shape[-2:]
        feats = [z[0]] + [F.interpolate(z_i, size=size, mode="bilinear", align_corners=True) for z_i in z[1:]]
        return self.last_layer(torch.cat(feats, dim=1))
