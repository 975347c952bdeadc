"""Layers whose per-forward state is shared by every solver step: normalised weights and variational dropout.

A DEQ applies its cell f tens of times per forward pass. Two pieces of f must not change between those
applications, and should not be recomputed for each:

- Normalised convolutions recompute their ``weight`` once per forward pass:
  :class:`WeightNormConv2d` stores ``weight_g`` (out, 1, 1, 1) and ``weight_v`` like locuslab/mdeq
  (weight = v · g / ||v||, norm over all dims but 0); :class:`SpectralNormConv2d` stores torchdeq's spectral-norm
  layout, ``weight_orig``, ``weight_g`` (out, 1, 1, 1) and the power-iteration buffers ``weight_u`` (out,) and
  ``weight_v`` (in · kh · kw,) (weight = W · g / σ(W), σ estimated by one power iteration per training forward).
  Both take torchdeq's options (:class:`NormOptions`): a fixed target instead of the learned scale g, and a clip
  of the factor g / norm.
- :class:`VariationalDropout2d` draws one (B, C, 1, 1) mask per forward pass and applies it at every
  pixel and every solver step, so the cell is the same function throughout the solve.

Call :func:`reset_per_forward` on the model at the start of each forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

NORM_TYPES = ("weight_norm", "spectral_norm", "none")


@dataclass(frozen=True)
class NormOptions:
    """torchdeq's normalisation options (``--norm_no_scale``, ``--norm_target_norm``, ``--norm_clip``,
    ``--norm_clip_value``, ``--sn_n_power_iters``): factor = g / norm with a learned per-output-channel g
    (``learn_scale``), else ``target_norm`` / norm; clipped at ``clip_value`` when ``clip``."""

    learn_scale: bool = True
    target_norm: float = 1.0
    clip: bool = False
    clip_value: float = 1.0
    power_iters: int = 1


class NormalisedWeightMixin:
    """What weight norm and spectral norm share: the scale g (or a fixed target), the clip, and a weight
    computed once per forward pass (:func:`reset_per_forward`) with the caller's grad mode."""

    options: NormOptions

    def _add_scale(self, rows: int, dims: int, init: Tensor | None, options: NormOptions) -> None:
        """Register ``weight_g`` (rows, 1, ...) from ``init`` (default: the target norm) when the scale is learned."""
        self.options = options
        self._weight: Tensor | None = None
        if options.learn_scale:
            g = init if init is not None else torch.full((rows,) + (1,) * (dims - 1), float(options.target_norm))
            self.weight_g = nn.Parameter(g)

    def _factor(self, norm: Tensor) -> Tensor:
        opts = self.options
        factor = self.weight_g / norm if opts.learn_scale else opts.target_norm / norm
        return factor.clamp(max=opts.clip_value) if opts.clip else factor

    def compute_weight(self) -> Tensor:
        raise NotImplementedError

    def raw_weight(self) -> Tensor:
        """The unnormalised weight parameter (what an initialiser draws)."""
        raise NotImplementedError

    def reset_scale(self) -> None:
        """Make the scale consistent with a freshly drawn raw weight."""
        raise NotImplementedError

    def reset_per_forward(self) -> None:
        self._weight = self.compute_weight()

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        return self._weight if self._weight is not None else self.compute_weight()


class WeightNormMixin(NormalisedWeightMixin):
    """Weight normalisation for a module with a ``weight`` (Linear, Conv1d, Conv2d), as locuslab/mdeq,
    locuslab/deq and torchdeq store it: ``weight_g`` (out, 1, ...) and ``weight_v``, weight = v · g / ||v|| with
    the norm over every dim but 0, recomputed once per forward pass (:func:`reset_per_forward`)."""

    def _split_weight(self, options: NormOptions = NormOptions()) -> None:
        weight = self.weight.detach()
        del self.weight  # replaced by weight_g / weight_v (original names, no `weight` in the state_dict)
        self._add_scale(weight.shape[0], weight.dim(), self._norm(weight), options)
        self.weight_v = nn.Parameter(weight.clone())

    @staticmethod
    def _norm(v: Tensor) -> Tensor:
        return v.flatten(1).norm(dim=1).reshape(-1, *([1] * (v.dim() - 1)))

    def compute_weight(self) -> Tensor:
        return self.weight_v * self._factor(self._norm(self.weight_v))

    def raw_weight(self) -> Tensor:
        return self.weight_v

    def reset_scale(self) -> None:
        """g = ||v||, so the normalised weight equals v (after v is re-initialised)."""
        if self.options.learn_scale:
            with torch.no_grad():
                self.weight_g.copy_(self._norm(self.weight_v))


class SpectralNormMixin(NormalisedWeightMixin):
    """Spectral normalisation in torchdeq's layout and semantics: ``weight_orig`` W, ``weight_g`` (out, 1, ...)
    initialised to the target norm, buffers ``weight_u``, ``weight_v`` (W's leading singular vectors, estimated by
    ``power_iters`` power iterations at each training forward); weight = W · g / σ with σ = uᵀ W v. In eval mode
    σ uses the stored vectors, so evaluation is deterministic and matches the checkpoint."""

    def _spectralise(self, options: NormOptions) -> None:
        weight = self.weight.detach()
        del self.weight
        self.weight_orig = nn.Parameter(weight.clone())
        self._add_scale(weight.shape[0], weight.dim(), None, options)
        rows, cols = weight.shape[0], weight[0].numel()
        self.register_buffer("weight_u", nn.functional.normalize(weight.new_empty(rows).normal_(), dim=0))
        self.register_buffer("weight_v", nn.functional.normalize(weight.new_empty(cols).normal_(), dim=0))
        self.power_iteration(15)  # torch.nn.utils.spectral_norm's warm start: sigma is sensible from the start

    @torch.no_grad()
    def power_iteration(self, steps: int) -> None:
        """``steps`` power iterations on W, updating ``weight_u`` and ``weight_v`` in place."""
        mat = self.weight_orig.flatten(1)
        for _ in range(steps):
            self.weight_v.copy_(nn.functional.normalize(mat.t() @ self.weight_u, dim=0, eps=1e-12))
            self.weight_u.copy_(nn.functional.normalize(mat @ self.weight_v, dim=0, eps=1e-12))

    def sigma(self) -> Tensor:
        """σ(W) ≈ uᵀ W v with the stored vectors (differentiable in W only, as in torchdeq)."""
        return torch.dot(self.weight_u, self.weight_orig.flatten(1) @ self.weight_v)

    def compute_weight(self) -> Tensor:
        return self.weight_orig * self._factor(self.sigma())

    def raw_weight(self) -> Tensor:
        return self.weight_orig

    def reset_per_forward(self) -> None:
        if self.training:  # torchdeq: one step of power iteration per training forward, none in eval
            self.power_iteration(self.options.power_iters)
        super().reset_per_forward()

    def reset_scale(self) -> None:
        """g = target norm and fresh singular vectors (after W is re-initialised)."""
        if self.options.learn_scale:
            with torch.no_grad():
                self.weight_g.fill_(self.options.target_norm)
        self.power_iteration(15)


class WeightNormConv2d(WeightNormMixin, nn.Conv2d):
    """Conv2d with weight normalisation; the normalised weight is cached until the next reset."""

    def __init__(self, *args, norm_options: NormOptions = NormOptions(), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._split_weight(norm_options)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight, self.bias)


class SpectralNormConv2d(SpectralNormMixin, nn.Conv2d):
    """Conv2d with torchdeq's spectral normalisation; the normalised weight is cached until the next reset."""

    def __init__(self, *args, norm_options: NormOptions = NormOptions(), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._spectralise(norm_options)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight, self.bias)


class WeightNormConv1d(WeightNormMixin, nn.Conv1d):
    """Conv1d with weight normalisation (the DEQ-Transformer's kernel-1 projections)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._split_weight()

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight, self.bias)


class WeightNormLinear(WeightNormMixin, nn.Linear):
    """Linear with weight normalisation (the DEQ-Transformer's feed-forward layers)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._split_weight()

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


def _dropout_rate(p: float) -> float:
    """``p``, or a ValueError when it is not a dropout rate."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout rate p must be in [0, 1), got {p}")
    return p


class VariationalDropout2d(nn.Module):
    """Dropout with one mask per (sample, channel), fixed for a whole forward pass (train mode only)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = _dropout_rate(p)
        self.mask: Tensor | None = None

    def reset_per_forward(self) -> None:
        self.mask = None  # drawn lazily from the first input's shape

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.mask is None or self.mask.shape[:2] != x.shape[:2]:
            keep = torch.empty(x.shape[0], x.shape[1], 1, 1, device=x.device, dtype=x.dtype).bernoulli_(1 - self.p)
            self.mask = keep / (1 - self.p)
        return x * self.mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


class SequenceDropout(nn.Module):
    """Variational dropout for sequence models: one mask per forward pass, shared along ``shared_dims`` (size 1
    there), e.g. the same features dropped at every position and every solver step (train mode only)."""

    def __init__(self, p: float = 0.0, shared_dims: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.p, self.shared_dims = _dropout_rate(p), shared_dims
        self.mask: Tensor | None = None

    def reset_per_forward(self) -> None:
        self.mask = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        shape = [1 if d in self.shared_dims else n for d, n in enumerate(x.shape)]
        if self.mask is None or list(self.mask.shape) != shape:
            self.mask = torch.empty(shape, device=x.device, dtype=x.dtype).bernoulli_(1 - self.p) / (1 - self.p)
        return x * self.mask

    def extra_repr(self) -> str:
        return f"p={self.p}, shared_dims={self.shared_dims}"


PER_FORWARD = (NormalisedWeightMixin, VariationalDropout2d, SequenceDropout)


def reset_per_forward(module: nn.Module) -> None:
    """Recompute normalised weights (and, in training, spectral norm's power iteration) and clear dropout masks in
    every submodule."""
    for m in module.modules():
        if isinstance(m, PER_FORWARD):
            m.reset_per_forward()


class CellRunner:
    """How a model calls its DEQ cell: eagerly, or with ``compile`` through
    ``torch.compile`` (static shapes, compiled on first use) wherever autograd is off.

    Compiling pays in the forward solver's iterations, which run without autograd, from inductor's fused
    kernels; the one application with a graph and its repeated VJPs stay eager: a compiled backward was measured
    slower here, because it recomputes the fused pointwise ops on every VJP. A plain object, not a submodule, so
    the state_dict is the same either way. A new input shape (another batch size, a memory that grew)
    compiles again.
    """

    def __init__(self, module: nn.Module, compile: bool = False) -> None:
        self.module, self.compile = module, compile
        self._compiled: Callable[..., Any] | None = None

    def __call__(self, *args: Any) -> Any:
        if not self.compile or torch.is_grad_enabled():
            return self.module(*args)
        if self._compiled is None:
            self._compiled = torch.compile(self.module, dynamic=False)
        return self._compiled(*args)


NORM_CONVS: dict[str, type[nn.Conv2d]] = {"weight_norm": WeightNormConv2d, "spectral_norm": SpectralNormConv2d}


def norm_conv2d(norm: str, *args: Any, options: NormOptions = NormOptions(), **kwargs: Any) -> nn.Conv2d:
    """``nn.Conv2d(*args, **kwargs)`` normalised by ``norm`` (one of ``NORM_TYPES``; "none" is a plain conv)."""
    if norm == "none":
        return nn.Conv2d(*args, **kwargs)
    if norm not in NORM_CONVS:
        raise ValueError(f"unknown normalisation norm={norm!r}; known: {', '.join(NORM_TYPES)}")
    return NORM_CONVS[norm](*args, norm_options=options, **kwargs)


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, bias: bool = False, norm: str = "none",
            options: NormOptions = NormOptions()) -> nn.Conv2d:
    """3x3 convolution with padding 1, normalised by ``norm`` (see :func:`norm_conv2d`)."""
    return norm_conv2d(norm, in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=bias, options=options)


__all__ = ["NormOptions", "NORM_TYPES", "norm_conv2d", "SpectralNormConv2d", "WeightNormConv1d", "WeightNormConv2d",
           "WeightNormLinear", "VariationalDropout2d", "SequenceDropout",
           "reset_per_forward", "conv3x3", "CellRunner"]
