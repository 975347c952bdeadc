"""Layers whose per-forward state is shared by every solver step: weight norm and variational dropout.

A DEQ applies its cell f tens of times per forward pass. Two pieces of f must not change between those
applications, and should not be recomputed for each:

- :class:`WeightNormConv2d` stores ``weight_g`` (out, 1, 1, 1) and ``weight_v`` like locuslab/mdeq
  (weight = v · g / ||v||, norm over all dims but 0) and recomputes ``weight`` once per forward pass.
- :class:`VariationalDropout2d` draws one (B, C, 1, 1) mask per forward pass and applies it at every
  pixel and every solver step, so the cell is the same function throughout the solve.

Call :func:`reset_per_forward` on the model at the start of each forward pass.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from deqlab.errors import ConfigError


class WeightNormMixin:
    """Weight normalisation for a module with a ``weight`` (Linear, Conv1d, Conv2d), as locuslab/mdeq and
    locuslab/deq store it: ``weight_g`` (out, 1, ...) and ``weight_v``, weight = v · g / ||v|| with the norm
    over every dim but 0, recomputed once per forward pass (:func:`reset_per_forward`)."""

    def _split_weight(self) -> None:
        weight = self.weight.detach()
        del self.weight  # replaced by weight_g / weight_v (original names, no `weight` in the state_dict)
        self.weight_g = nn.Parameter(self._norm(weight))
        self.weight_v = nn.Parameter(weight.clone())
        self._weight: Tensor | None = None

    @staticmethod
    def _norm(v: Tensor) -> Tensor:
        return v.flatten(1).norm(dim=1).reshape(-1, *([1] * (v.dim() - 1)))

    def compute_weight(self) -> Tensor:
        return self.weight_v * (self.weight_g / self._norm(self.weight_v))

    def reset_per_forward(self) -> None:
        # Computed with the caller's grad mode, so a training forward keeps the graph to g and v.
        self._weight = self.compute_weight()

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        return self._weight if self._weight is not None else self.compute_weight()


class WeightNormConv2d(WeightNormMixin, nn.Conv2d):
    """Conv2d with weight normalisation; the normalised weight is cached until the next reset."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._split_weight()

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


class VariationalDropout2d(nn.Module):
    """Dropout with one mask per (sample, channel), fixed for a whole forward pass (train mode only)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"dropout rate (MODEL.DROPOUT) must be in [0, 1), got {p}")
        self.p = p
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
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"dropout rate must be in [0, 1), got {p}")
        self.p, self.shared_dims = p, shared_dims
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


PER_FORWARD = (WeightNormMixin, VariationalDropout2d, SequenceDropout)


def reset_per_forward(module: nn.Module) -> None:
    """Recompute weight-normalised weights and clear dropout masks in every submodule."""
    for m in module.modules():
        if isinstance(m, PER_FORWARD):
            m.reset_per_forward()


class CellRunner:
    """How a model calls its DEQ cell: eagerly, or with ``compile`` (``MODEL.COMPILE``) through
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


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, bias: bool = False, wnorm: bool = False) -> nn.Conv2d:
    """3x3 convolution with padding 1, weight-normalised when ``wnorm``."""
    cls = WeightNormConv2d if wnorm else nn.Conv2d
    return cls(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=bias)


__all__ = ["WeightNormConv1d", "WeightNormConv2d", "WeightNormLinear", "VariationalDropout2d", "SequenceDropout",
           "reset_per_forward", "conv3x3", "CellRunner"]
