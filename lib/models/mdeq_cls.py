"""MDEQ image classifier: the MDEQ backbone and the HRNet-style classification head of locuslab/mdeq.

Head: each resolution's equilibrium state goes through a Bottleneck that widens it (``incre_modules``);
then, from finest to coarsest, the running feature is downsampled by a strided 3x3 conv
(``downsamp_modules``) and added to the next resolution's; a 1x1 conv (``final_layer``), global average
pooling and a linear ``classifier`` give the logits.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from deqlab.layers import conv3x3
from deqlab.models.mdeq_core import BN_MOMENTUM, MDEQBackbone


class Bottleneck(nn.Module):
    """1x1 → 3x3 → 1x1 (x4 wide) residual block; its BatchNorms have no affine parameters, as in the original."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM, affine=False)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM, affine=False)
        self.conv3 = nn.Conv2d(planes, out_ch, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch, momentum=BN_MOMENTUM, affine=False)
        self.relu = nn.ReLU()
        self.downsample = None if in_ch == out_ch else nn.Sequential(
            nn.Conv2d(in_ch, out_ch, kernel_size=1, bias=False), nn.BatchNorm2d(out_ch, momentum=BN_MOMENTUM))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


class MDEQClassifier(MDEQBackbone):
    """``logits, info = model(x, train_step=-1, compute_jac_loss=False, f_thres=None)`` (see ``mdeq_core``
    for ``MODEL.SKIP`` and ``LOSS.FPC``)."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg, in_channels=cfg.MODEL.IN_CHANNELS)
        stage = cfg.MODEL.EXTRA.FULL_STAGE
        head = list(stage.HEAD_CHANNELS)
        wide = [c * Bottleneck.expansion for c in head]
        self.incre_modules = nn.ModuleList(nn.Sequential(Bottleneck(c, h)) for c, h in zip(self.num_channels, head))
        self.downsamp_modules = nn.ModuleList(
            nn.Sequential(conv3x3(wide[i], wide[i + 1], stride=2, bias=True),
                          nn.BatchNorm2d(wide[i + 1], momentum=BN_MOMENTUM), nn.ReLU())
            for i in range(len(head) - 1))
        self.final_layer = nn.Sequential(nn.Conv2d(wide[-1], stage.FINAL_CHANSIZE, kernel_size=1),
                                         nn.BatchNorm2d(stage.FINAL_CHANSIZE, momentum=BN_MOMENTUM), nn.ReLU())
        self.classifier = nn.Linear(stage.FINAL_CHANSIZE, cfg.MODEL.NUM_CLASSES)
        self.init_weights()

    def head(self, z: list[Tensor]) -> Tensor:
        """Logits from the list of branch states."""
        y = self.incre_modules[0](z[0])
        for i, down in enumerate(self.downsamp_modules):
            y = self.incre_modules[i + 1](z[i + 1]) + down(y)
        y = self.final_layer(y).mean(dim=(2, 3))
        return self.classifier(y)
