"""Anderson acceleration (type II) with a Gram-scaled regulariser.

Keep the last m iterates xᵢ and residuals gᵢ = f(xᵢ) − xᵢ. Each step finds weights α (Σα = 1) minimising
||Σ αᵢ gᵢ||² + λ' ||α||², then moves to x ← Σ αᵢ (xᵢ + β gᵢ) (β = 1: undamped). With G the (m, N) residual
matrix the weights solve the bordered system

    [ 0   1ᵀ         ] [ ν ]   [ 1 ]
    [ 1   G Gᵀ + λ'I ] [ α ] = [ 0 ].

A fixed λ' stops helping (or starts hurting) once residuals are tiny, because G Gᵀ shrinks quadratically
with them; here λ' = λ · tr(G Gᵀ)/m, scaled to the Gram matrix, so the conditioning is the same at every
scale and the method keeps converging to small tolerances. The systems are (m+1)×(m+1) per sample.

Budget: ``max_iter`` f evaluations, as the ``threshold`` of locuslab/deq's ``anderson`` (which evaluates x0 and
x1 = f(x0), then one mixed iterate per k = 2 .. threshold − 1) and torchdeq's ``max_iter``. The iterates
evaluated are x0 .. x_{max_iter−1}: ``stats["nfe"]`` counts the evaluations, ``stats["nstep"]`` the steps
(``nfe − 1``). The returned iterate is the evaluated one with the lowest residual, as in locuslab/deq, which
only compares x2 onwards (and fails below a budget of 3); here x0 and x1 count too, so a budget of 1 returns x0.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from deqlab.solvers.common import Tracker, check_args, flatten_cell


def _mixing_weights(gram: Tensor, lam: float) -> Tensor:
    """α (B, n) minimising αᵀ(G Gᵀ + λ'I)α subject to Σα = 1, λ' = λ·tr(G Gᵀ)/n.

    A = G Gᵀ + λ'I is symmetric positive definite, so the bordered system's solution is α = A⁻¹1 / (1ᵀA⁻¹1):
    one n×n solve per sample instead of the (n+1)×(n+1) bordered one, and fewer small ops per step.
    """
    n = gram.shape[-1]
    # The floor keeps the system solvable for a sample whose residuals are exactly zero (a zero gradient
    # in the backward pass, say): its weights then come out uniform, and every iterate is its fixed point.
    scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-280) * max(lam, 1e-12)
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    y = torch.linalg.solve(gram + scale[:, None, None] * eye,
                           gram.new_ones(gram.shape[0], n, 1))
    return (y / y.sum(dim=1, keepdim=True)).squeeze(2)


def anderson(f: Callable[[Tensor], Tensor], z0: Tensor, max_iter: int = 30, tol: float = 1e-3,
             stop_mode: str = "rel", m: int = 5, beta: float = 1.0, lam: float = 1e-4) -> tuple[Tensor, dict[str, Any]]:
    """Solve z = f(z) by Anderson acceleration with window ``m`` and damping ``beta``, at most ``max_iter`` f
    evaluations. Returns ``(z, stats)``.

    Defaults: m = 5 (more history costs 2 passes over the state per extra row and rarely saves steps on
    contractive DEQ cells), β = 1 (undamped), λ = 1e-4 (relative to the Gram matrix's mean diagonal).
    """
    check_args(max_iter, tol, stop_mode)
    if m < 1 or not 0.0 < beta <= 1.0 or lam < 0:
        raise ValueError(f"anderson needs m >= 1, 0 < beta <= 1 and lam >= 0; got m={m}, beta={beta}, lam={lam}")
    f, x = flatten_cell(f, z0)
    tracker = Tracker(x, tol, stop_mode)
    if torch.is_grad_enabled():
        return _anderson_tracked(f, x, tracker, max_iter, m, beta, lam, z0.shape)
    # In place. Rings are slot-major, (m, B, N): a slot is one contiguous (B, N) block, written without a copy
    # by ``out=``, and (B, n, N) views of them are plain strided batched matrices for bmm. F holds f(xᵢ),
    # G holds gᵢ = f(xᵢ) − xᵢ; the new iterate is Σ αᵢ fᵢ − (1 − β) Σ αᵢ gᵢ = Σ αᵢ (xᵢ + β gᵢ).
    # The Gram matrix G Gᵀ is kept in float64 and updated by one row/column per step (one pass over G)
    # instead of being recomputed (n passes). Mixing weights are solved in float64: the Gram matrix squares
    # the residuals, so float32 would lose them when they are small.
    b, n_state = x.shape
    m = min(m, max_iter)
    fs, gs = x.new_empty(m, b, n_state), x.new_empty(m, b, n_state)
    gram = torch.zeros(b, m, m, dtype=torch.float64, device=x.device)
    x_bufs = (torch.empty_like(x), torch.empty_like(x))  # ping-pong: xₖ stays intact while xₖ₊₁ is written
    for k in range(max_iter):
        slot, n = k % m, min(k + 1, m)
        fx = f(x)
        g = torch.sub(fx, x, out=gs[slot])
        # x₀ is the caller's z0: copied, never held; after the last evaluation no next iterate is mixed
        if tracker.update(x, fx, g, hold=k > 0) or k == max_iter - 1:
            break
        fs[slot].copy_(fx)
        g_hist = gs[:n].transpose(0, 1)  # (B, n, N)
        row = torch.bmm(g.unsqueeze(1), g_hist.transpose(1, 2)).squeeze(1).double()  # gᵀ gⱼ, (B, n)
        gram[:, slot, :n] = row
        gram[:, :n, slot] = row
        alpha = _mixing_weights(gram[:, :n, :n], lam).to(x.dtype).unsqueeze(1)  # (B, 1, n)
        x = x_bufs[k % 2]
        torch.bmm(alpha, fs[:n].transpose(0, 1), out=x.unsqueeze(1))
        if beta != 1.0:
            x.unsqueeze(1).baddbmm_(alpha, g_hist, alpha=beta - 1.0)
    return tracker.result(z0.shape, tracker.nfe - 1)


def _anderson_tracked(f: Callable[[Tensor], Tensor], x: Tensor, tracker: Tracker, max_iter: int, m: int,
                      beta: float, lam: float, shape: torch.Size) -> tuple[Tensor, dict[str, Any]]:
    """The grad-enabled path: every update out of place (histories as lists), so autograd sees the whole solve."""
    xs: list[Tensor] = []
    gs: list[Tensor] = []
    for k in range(max_iter):
        fx = f(x)
        g = fx - x
        if tracker.update(x, fx, g) or k == max_iter - 1:
            break
        xs, gs = (xs + [x])[-m:], (gs + [g])[-m:]  # new lists: nothing autograd saved is modified
        G = torch.stack(gs, dim=1)  # (B, n, N)
        gram = torch.bmm(G, G.transpose(1, 2)).double()
        alpha = _mixing_weights(gram, lam).to(x.dtype).unsqueeze(1)  # (B, 1, n)
        x = torch.bmm(alpha, torch.stack(xs, dim=1)).squeeze(1) + beta * torch.bmm(alpha, G).squeeze(1)
    return tracker.result(shape, tracker.nfe - 1)
