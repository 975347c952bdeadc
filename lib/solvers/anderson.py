"""Anderson acceleration (type II) with a Gram-scaled regulariser.

Keep the last m iterates xᵢ and residuals gᵢ = f(xᵢ) − xᵢ. Each step finds weights α (Σα = 1) minimising
||Σ αᵢ gᵢ||² + λ' ||α||², then moves to x ← Σ αᵢ (xᵢ + β gᵢ) (β = 1: undamped). With G the (m, N) residual
matrix the weights solve the bordered system

    [ 0   1ᵀ         ] [ ν ]   [ 1 ]
    [ 1   G Gᵀ + λ'I ] [ α ] = [ 0 ].

A fixed λ' stops helping (or starts hurting) once residuals are tiny, because G Gᵀ shrinks quadratically
with them; here λ' = λ · tr(G Gᵀ)/m, scaled to the Gram matrix, so the conditioning is the same at every
scale and the method keeps converging to small tolerances. The systems are (m+1)×(m+1) per sample.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from deqlab.solvers.common import History, Tracker, check_args, flatten_cell


def _mixing_weights(gram: Tensor, lam: float) -> Tensor:
    """α (B, n) minimising αᵀ(G Gᵀ + λ'I)α subject to Σα = 1, λ' = λ·tr(G Gᵀ)/n."""
    b, n, _ = gram.shape
    # The floor keeps the system solvable for a sample whose residuals are exactly zero (a zero gradient
    # in the backward pass, say): its weights then come out uniform, and every iterate is its fixed point.
    scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-280)
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    system = gram.new_zeros(b, n + 1, n + 1)
    system[:, 0, 1:] = 1
    system[:, 1:, 0] = 1
    system = system + torch.nn.functional.pad(gram + (max(lam, 1e-12) * scale)[:, None, None] * eye, (1, 0, 1, 0))
    rhs = gram.new_zeros(b, n + 1, 1)
    rhs[:, 0] = 1
    return torch.linalg.solve(system, rhs)[:, 1:, 0]


def anderson(f: Callable[[Tensor], Tensor], z0: Tensor, max_iter: int = 30, tol: float = 1e-3,
             stop_mode: str = "rel", m: int = 5, beta: float = 1.0, lam: float = 1e-4) -> tuple[Tensor, dict[str, Any]]:
    """Solve z = f(z) by Anderson acceleration with window ``m`` and damping ``beta``. Returns ``(z, stats)``."""
    check_args(max_iter, tol, stop_mode)
    if m < 1 or not 0.0 < beta <= 1.0 or lam < 0:
        raise ValueError(f"anderson needs m >= 1, 0 < beta <= 1 and lam >= 0; got m={m}, beta={beta}, lam={lam}")
    f, x = flatten_cell(f, z0)
    tracker = Tracker(x, tol, stop_mode)
    xs, gs = History(x, m), History(x, m)
    for _ in range(max_iter):
        fx = f(x)
        g = fx - x
        if tracker.update(x, fx, g):
            break
        xs.append(x)
        gs.append(g)
        # Solve in float64: the Gram matrix squares the residuals, so float32 loses them when they are small.
        G = gs.stacked()
        gram = torch.bmm(G, G.transpose(1, 2)).double()
        alpha = _mixing_weights(gram, lam).to(x.dtype).unsqueeze(1)  # (B, 1, n)
        x = torch.bmm(alpha, xs.stacked()).squeeze(1) + beta * torch.bmm(alpha, G).squeeze(1)
    return tracker.result(z0.shape)
