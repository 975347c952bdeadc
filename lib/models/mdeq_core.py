"""The multiscale equilibrium cell of MDEQ (Bai et al., NeurIPS 2020) and the backbone around it.

The cell f(z; x) acts on a list of states, one per resolution (branch i has NUM_CHANNELS[i] channels at
1/2^i of the stem's resolution):

1. per branch, residual blocks: z_i ↦ GN(relu(GN(drop(conv(relu(GN(conv(z_i))))) + x_i) + z_i)), where the
   input injection x_i is the stem output for branch 0 and zero elsewhere;
2. multiscale fusion: branch i receives the sum of every branch j, downsampled by i − j strided 3x3 convs
   (j < i) or upsampled by a 1x1 conv and nearest interpolation (j > i), then relu → 1x1 conv → GN.

Module and parameter names follow locuslab/mdeq, so its released state_dicts load unchanged (the frozen
``fullstage_copy`` and the ``deq.func*`` aliases of the original are not kept; the loader drops them).
:class:`CellNorm` says which convs are normalised and how (``MODEL.NORM_TYPE``, ``MODEL.NORM_LAYERS``: locuslab/mdeq's
weight norm by default, torchdeq's layouts and spectral norm otherwise).

Initial state (``MODEL.SKIP``; Skip DEQ, Pal et al. 2022, multiscale as ``MultiScaleSkipDeepEquilibriumNetwork``):
``none`` starts every branch from zeros; ``skip`` predicts each branch's state from the injection with
:class:`SkipPredictor` (its own parameters, under ``skip_predictor.``); ``skipreg`` (Skip DEQ V2) starts from
one cell application from zeros, f(0; x), with no extra parameters. The DEQ layer starts from the prediction
and returns the skip loss mean((z0 − z*)²) (see ``deqlab.deq``) in ``info["skip_loss"]``; the training objective
(``deqlab.objective``) adds ``LOSS.SKIP_WEIGHT`` times it. The predictor reads the injection detached, so with
``skip`` the skip loss trains the predictor only and the task loss everything else. The prediction is also the
initial state at test time. With ``skipreg``, the f evaluation that makes z0 is counted in ``info["fwd"]["nfe"]``,
not as a step.

The DEQ layer (``deqlab.get_deq(cfg)``) decides from ``train_step`` whether to pretrain unrolled
(``TRAIN.PRETRAIN_STEPS``, ``TRAIN.ALL_UNROLLED``, ``MODEL.NUM_LAYERS`` applications of f) and estimates the
spectral radius in eval mode (``DEQ.SPECTRAL_RADIUS_MODE``).

Fixed-point correction (``LOSS.FPC`` with ``DEQ.GRAD phantom``): in training the DEQ layer returns the phantom
iterates (``info["trajectory"]``), the classifier and segmenter put the output of each in
``info["trajectory_outputs"]`` (the last is the returned output), and the training objective applies
``deqlab.objective.fixed_point_correction`` to their task losses.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from deqlab.errors import ConfigError
from deqlab.factory import get_deq
from deqlab.layers import (CellRunner, NormalisedWeightMixin, NormOptions, VariationalDropout2d, conv3x3, norm_conv2d,
                           reset_per_forward)
from deqlab.utils.dist import pick_device

BN_MOMENTUM = 0.1


@dataclass(frozen=True)
class CellNorm:
    """How the cell's convs are normalised: ``type`` (weight_norm, spectral_norm, none) on the conv groups in
    ``parts`` (``blocks``: the residual blocks' conv1/conv2; ``fuse``: the fusion convs; ``post_fuse``: the 1x1
    convs after fusion), with torchdeq's ``options``. locuslab/mdeq normalises blocks and post_fuse; torchdeq's
    zoo all three on CIFAR and the blocks only on ImageNet (its ``filter_out='fuse_layers'`` also matches
    ``post_fuse_layers``)."""

    type: str = "weight_norm"
    parts: tuple[str, ...] = ("blocks", "post_fuse")
    options: NormOptions = NormOptions()

    def kind(self, part: str) -> str:
        """The normalisation of conv group ``part``."""
        return self.type if part in self.parts else "none"

    @classmethod
    def from_config(cls, m: Any) -> "CellNorm":
        """From ``cfg.MODEL``: ``NORM_TYPE`` auto follows ``WNORM`` (weight_norm or none); any other value decides
        (the config rules refuse one that contradicts ``WNORM`` False)."""
        kind = m.NORM_TYPE
        if kind == "auto":
            kind = "weight_norm" if m.WNORM else "none"
        options = NormOptions(learn_scale=not m.NORM_NO_SCALE, target_norm=m.NORM_TARGET_NORM, clip=m.NORM_CLIP,
                              clip_value=m.NORM_CLIP_VALUE, power_iters=m.SN_N_POWER_ITERS)
        return cls(kind, tuple(m.NORM_LAYERS), options)


class BasicBlock(nn.Module):
    """Residual block with an expanded hidden width; the injection enters before the second norm."""

    def __init__(self, channels: int, expansion: int, num_groups: int, dropout: float, norm: CellNorm,
                 gn_affine: bool = True) -> None:
        super().__init__()
        hidden = expansion * channels
        kind = norm.kind("blocks")
        self.conv1 = conv3x3(channels, hidden, norm=kind, options=norm.options)
        self.gn1 = nn.GroupNorm(num_groups, hidden, affine=gn_affine)
        self.conv2 = conv3x3(hidden, channels, norm=kind, options=norm.options)
        self.gn2 = nn.GroupNorm(num_groups, channels, affine=gn_affine)
        self.gn3 = nn.GroupNorm(num_groups, channels, affine=gn_affine)
        self.relu = nn.ReLU()
        self.drop = VariationalDropout2d(dropout)

    def forward(self, x: Tensor, injection: Tensor | None = None) -> Tensor:
        out = self.relu(self.gn1(self.conv1(x)))
        out = self.drop(self.conv2(out))
        if injection is not None:
            out = out + injection
        out = self.gn2(out) + x
        return self.gn3(self.relu(out))


class BranchNet(nn.Module):
    """The residual blocks of one resolution; the injection goes into the first block only."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor, injection: Tensor | None = None) -> Tensor:
        x = self.blocks[0](x, injection)
        for block in self.blocks[1:]:
            x = block(x)
        return x


def _conv_gn(in_ch: int, out_ch: int, groups: int, affine: bool, kernel: int, stride: int, norm: CellNorm) -> list:
    conv = norm_conv2d(norm.kind("fuse"), in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False,
                       options=norm.options)
    return [("conv", conv),
            ("gnorm", nn.GroupNorm(groups, out_ch, affine=affine))]


class DownsampleModule(nn.Module):
    """Branch j → i (j < i): i − j stride-2 3x3 convs; all but the last keep j's width and end in a relu."""

    def __init__(self, channels: list[int], src: int, dst: int, num_groups: int, affine: bool, norm: CellNorm) -> None:
        super().__init__()
        steps = []
        for k in range(dst - src):
            last = k == dst - src - 1
            layers = _conv_gn(channels[src], channels[dst] if last else channels[src], num_groups, affine, 3, 2, norm)
            if not last:
                layers.append(("relu", nn.ReLU()))
            steps.append(nn.Sequential(OrderedDict(layers)))
        self.net = nn.Sequential(*steps)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class UpsampleModule(nn.Module):
    """Branch j → i (j > i): 1x1 conv, GroupNorm, nearest upsampling by 2^(j − i)."""

    def __init__(self, channels: list[int], src: int, dst: int, num_groups: int, affine: bool, norm: CellNorm) -> None:
        super().__init__()
        layers = _conv_gn(channels[src], channels[dst], num_groups, affine, 1, 1, norm)
        layers.append(("upsample", nn.Upsample(scale_factor=2 ** (src - dst), mode="nearest")))
        self.net = nn.Sequential(OrderedDict(layers))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MDEQModule(nn.Module):
    """The cell f: per-resolution residual blocks, then multiscale fusion (see the module docstring)."""

    def __init__(self, channels: list[int], num_blocks: list[int], expansion: int, num_groups: int,
                 dropout: float, norm: CellNorm, block_gn_affine: bool = True, fuse_gn_affine: bool = True,
                 post_gn_affine: bool = True) -> None:
        super().__init__()
        n = len(channels)
        self.num_branches = n
        self.branches = nn.ModuleList(
            BranchNet([BasicBlock(channels[i], expansion, num_groups, dropout, norm, block_gn_affine)
                       for _ in range(num_blocks[i])])
            for i in range(n))
        self.fuse_layers = nn.ModuleList(
            nn.ModuleList(None if i == j else
                          (UpsampleModule if j > i else DownsampleModule)(channels, j, i, num_groups, fuse_gn_affine,
                                                                           norm)
                          for j in range(n))
            for i in range(n)) if n > 1 else None
        self.post_fuse_layers = nn.ModuleList(
            nn.Sequential(OrderedDict([
                ("relu", nn.ReLU()),
                ("conv", norm_conv2d(norm.kind("post_fuse"), channels[i], channels[i], kernel_size=1, bias=False,
                                     options=norm.options)),
                ("gnorm", nn.GroupNorm(num_groups // 2, channels[i], affine=post_gn_affine))]))
            for i in range(n))

    def forward(self, z: list[Tensor], injection: list[Tensor | None]) -> list[Tensor]:
        blocks = [branch(z_i, x_i) for branch, z_i, x_i in zip(self.branches, z, injection)]
        if self.fuse_layers is None:
            return blocks
        fused = []
        for i in range(self.num_branches):
            y = blocks[i]
            for j in range(self.num_branches):
                if j != i:
                    y = y + self.fuse_layers[i][j](blocks[j])
            fused.append(self.post_fuse_layers[i](y))
        return fused


def _stem(in_channels: int, width: int, downsample_times: int) -> nn.Sequential:
    """Two 3x3 conv-BN-ReLU (stride 2 for the first ``downsample_times``), more stride-2 ones past two."""
    layers: list[tuple[str, nn.Module]] = []
    for k in range(max(2, downsample_times)):
        stride = 2 if k < downsample_times else 1
        conv = conv3x3(in_channels if k == 0 else width, width, stride=stride)
        bn, relu = nn.BatchNorm2d(width, momentum=BN_MOMENTUM), nn.ReLU()
        # The first two keep nn.Sequential's numeric names (0..5); locuslab/deq names the extra ones DS<k>.
        names = [str(3 * k), str(3 * k + 1), str(3 * k + 2)] if k < 2 else [f"DS{k + 1}", f"DS{k + 1}-BN",
                                                                             f"DS{k + 1}-RELU"]
        layers += list(zip(names, (conv, bn, relu)))
    return nn.Sequential(OrderedDict(layers))


class SkipPredictor(nn.Module):
    """Skip DEQ's explicit initial-state predictor, one small conv stack per branch (``MODEL.SKIP skip``).

    Branch i: 3x3 conv (injection width → ``width``), then i stride-2 3x3 convs (1/2^i of the injection's
    resolution), each followed by GroupNorm and ReLU, then a 3x3 conv to the branch's width and a GroupNorm
    whose scale starts at 0, so an untrained predictor gives z0 = 0 like the plain MDEQ.
    """

    def __init__(self, in_channels: int, channels: list[int], width: int, num_groups: int) -> None:
        super().__init__()

        def norm(c: int) -> nn.GroupNorm:
            return nn.GroupNorm(math.gcd(num_groups, c), c)

        branches = []
        for i, out_ch in enumerate(channels):
            layers: list[nn.Module] = [conv3x3(in_channels, width), norm(width), nn.ReLU()]
            for _ in range(i):
                layers += [conv3x3(width, width, stride=2), norm(width), nn.ReLU()]
            layers += [conv3x3(width, out_ch), norm(out_ch)]
            branches.append(nn.Sequential(*layers))
        self.branches = nn.ModuleList(branches)
        self.reset_output_scale()

    def reset_output_scale(self) -> None:
        for branch in self.branches:
            nn.init.zeros_(branch[-1].weight)

    def forward(self, x: Tensor) -> list[Tensor]:
        return [branch(x) for branch in self.branches]


def check_resolutions(image_size: list[int], downsample_times: int, num_branches: int,
                      key: str = "MODEL.IMAGE_SIZE") -> None:
    """Each branch halves the resolution and fusion upsamples by powers of 2, so sizes must divide evenly."""
    for size in image_size:
        for _ in range(downsample_times):
            size = (size + 1) // 2
        if size % 2 ** (num_branches - 1):
            raise ConfigError(f"{key} {list(image_size)} gives {size}x{size} features after "
                              f"MODEL.DOWNSAMPLE_TIMES {downsample_times}, not divisible by 2^(NUM_BRANCHES - 1) = "
                              f"{2 ** (num_branches - 1)}; change IMAGE_SIZE or DOWNSAMPLE_TIMES")


class MDEQBackbone(nn.Module):
    """Stem, injection and the equilibrium cell; a subclass maps the equilibrium states (finest first) to its
    output with ``head``: ``output, info = model(x, train_step=-1, compute_jac_loss=False, f_thres=None)``."""

    def __init__(self, cfg: Any, in_channels: int = 3) -> None:
        super().__init__()
        m, stage = cfg.MODEL, cfg.MODEL.EXTRA.FULL_STAGE
        self.num_channels = list(stage.NUM_CHANNELS)
        check_resolutions(m.IMAGE_SIZE, m.DOWNSAMPLE_TIMES, stage.NUM_BRANCHES)
        width = self.num_channels[0]
        self.downsample = _stem(in_channels, width, m.DOWNSAMPLE_TIMES)
        # The original reuses the stem as the injection when it is shallow enough; else a 1x1 conv-BN-ReLU.
        self.stage0 = None if (m.DOWNSAMPLE_TIMES == 0 and stage.NUM_BRANCHES <= 2) else nn.Sequential(
            nn.Conv2d(width, width, kernel_size=1, bias=False), nn.BatchNorm2d(width, momentum=BN_MOMENTUM),
            nn.ReLU())
        self.fullstage = MDEQModule(self.num_channels, list(stage.NUM_BLOCKS), m.EXPANSION_FACTOR, m.NUM_GROUPS,
                                    m.DROPOUT, CellNorm.from_config(m), m.BLOCK_GN_AFFINE, m.FUSE_GN_AFFINE,
                                    m.POST_GN_AFFINE)
        # "auto": NHWC where the run is on the CPU, where oneDNN's convolutions are faster in that layout
        self.channels_last = (pick_device(cfg.DEVICE).type == "cpu" if m.CHANNELS_LAST == "auto"
                              else m.CHANNELS_LAST)
        self.cell = CellRunner(self.fullstage, m.COMPILE)
        self.skip = m.SKIP
        self.skip_predictor = SkipPredictor(width, self.num_channels, m.SKIP_CHANNELS or width,
                                            m.NUM_GROUPS) if m.SKIP == "skip" else None
        self.fpc_gap = cfg.LOSS.FPC_GAP if cfg.LOSS.FPC else 0
        self.deq = get_deq(cfg)

    def init_weights(self) -> None:
        """The original's init: convs N(0, 0.01), BatchNorm affine (1, 0); weight norm g = ||v||; spectral norm
        g = its target and fresh singular vectors."""
        for mod in self.modules():
            if isinstance(mod, NormalisedWeightMixin):
                nn.init.normal_(mod.raw_weight(), 0, 0.01)
                mod.reset_scale()
            elif isinstance(mod, nn.Conv2d):
                nn.init.normal_(mod.weight, 0, 0.01)
                if mod.bias is not None:
                    nn.init.normal_(mod.bias, 0, 0.01)
            elif isinstance(mod, nn.BatchNorm2d) and mod.affine:
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)
        if self.skip_predictor is not None:
            self.skip_predictor.reset_output_scale()
        if self.channels_last:  # after the init, so a seed gives the same weights in either layout
            self.to(memory_format=torch.channels_last)

    def cell_inputs(self, x: Tensor) -> tuple[list[Tensor | None], list[Tensor]]:
        """Stem + injection: the injection list (branch 0 only) and zero initial states for every branch."""
        x = self.downsample(x)
        x0 = self.stage0(x) if self.stage0 is not None else x
        b, _, h, w = x0.shape
        # Under autocast x0 is half precision; the solver state stays float32 (float64 stays float64).
        dtype = torch.promote_types(x0.dtype, torch.float32)
        z0 = [x0.new_zeros(b, self.num_channels[0], h, w, dtype=dtype)]
        for c in self.num_channels[1:]:
            h, w = h // 2, w // 2
            z0.append(x0.new_zeros(b, c, h, w, dtype=dtype))
        if self.channels_last:
            z0 = [z.contiguous(memory_format=torch.channels_last) for z in z0]
        return [x0] + [None] * (len(z0) - 1), z0

    def head(self, z: list[Tensor]) -> Tensor:
        """The task's output (logits) from the list of branch states."""
        raise NotImplementedError

    def forward(self, x: Tensor, train_step: int = -1, compute_jac_loss: bool = False,
                f_thres: int | None = None) -> tuple[Tensor, dict[str, Any]]:
        """``head`` of the equilibrium; in training with ``LOSS.FPC`` also ``head`` of each phantom iterate in
        ``info["trajectory_outputs"]``."""
        z, info = self.solve(x, train_step, compute_jac_loss, f_thres)
        if info["trajectory"] is not None:  # its last state is z: its output is the returned one
            info["trajectory_outputs"] = [self.head(z_k) for z_k in info["trajectory"]]
            return info["trajectory_outputs"][-1], info
        return self.head(z), info

    def solve(self, x: Tensor, train_step: int = -1, compute_jac_loss: bool = False,
              f_thres: int | None = None) -> tuple[list[Tensor], dict[str, Any]]:
        """The equilibrium states (finest first) and the DEQ layer's ``info``."""
        reset_per_forward(self.fullstage)  # weight norm once per forward, one dropout mask per forward
        if self.channels_last:  # the stem's outputs and so the injection follow the input's layout
            x = x.contiguous(memory_format=torch.channels_last)
        injection, z0 = self.cell_inputs(x)

        def f(z: list[Tensor]) -> list[Tensor]:
            return self.cell(z, injection)

        if self.skip == "skip":  # the injection detached: the skip loss trains the predictor only
            z0 = [p.to(z.dtype) for p, z in zip(self.skip_predictor(injection[0].detach()), z0)]
        elif self.skip == "skipreg":
            z0 = [fz.to(z.dtype) for fz, z in zip(f(z0), z0)]
        z, info = self.deq(f, z0, train_step=train_step, f_max_iter=f_thres,
                           compute_jac_loss=compute_jac_loss and self.training, z0_predicted=self.skip != "none",
                           trajectory_every=self.fpc_gap if self.training else 0)
        if self.skip == "skipreg" and info["fwd"] is not None:  # count the f evaluation that made z0
            info["fwd"] = {**info["fwd"], "nfe": info["fwd"]["nfe"] + 1}
        return z, info
