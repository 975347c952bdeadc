"""What every part of ``gpu_check.py`` shares: its result rows and the comparison measure."""
from __future__ import annotations

from typing import Any

import torch

STATUSES = ("pass", "fail", "n/a")


def row(check: str, device: str, status: str, value: Any = None, tolerance: Any = None, reason: str = "") -> dict:
    """One result: ``status`` pass / fail / n/a, the measured ``value`` against ``tolerance``, and why."""
    assert status in STATUSES, status
    return {"check": check, "device": device, "status": status, "value": value, "tolerance": tolerance,
            "reason": reason}


def compared(check: str, device: str, value: float, tolerance: float, reason: str = "") -> dict:
    """A row that passes when the finite ``value`` is at most ``tolerance``."""
    ok = bool(torch.isfinite(torch.tensor(value))) and value <= tolerance
    return row(check, device, "pass" if ok else "fail", value, tolerance, reason)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ over the flattened tensors (in float64: the measure itself must not round)."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def flat_grads(model: torch.nn.Module) -> torch.Tensor:
    """Every parameter's gradient, one vector (zeros where a parameter got none)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().flatten()
                      for p in model.parameters()])
