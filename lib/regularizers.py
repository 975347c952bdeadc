"""Jacobian diagnostics and regularisers for DEQs, all matrix-free (vector-Jacobian products only).

- :func:`jacobian_frobenius_loss`: Hutchinson estimate of ||J_f(z)||_F^2 / numel (Bai et al., ICML 2021,
  "Stabilizing Equilibrium Models by Jacobian Regularization"). E_v ||v^T J||^2 = tr(J J^T) = ||J||_F^2 for
  v ~ N(0, I). Built with ``create_graph=True`` so it can be added to the training loss.
- :func:`spectral_radius`: power iteration on v ↦ v^T J per sample, a diagnostic of how contractive f is
  at the equilibrium (ρ(J) < 1 is needed for plain iteration to converge).
"""
from __future__ import annotations

import torch
from torch import Tensor


def jacobian_frobenius_loss(fz: Tensor, z: Tensor, num_vectors: int = 1, create_graph: bool = True) -> Tensor:
    """Estimate ||∂fz/∂z||_F^2 / z.numel() with ``num_vectors`` Gaussian probes; ``z`` must require grad."""
    total = fz.new_zeros(())
    for _ in range(num_vectors):
        v = torch.randn_like(fz)
        (vjp,) = torch.autograd.grad(fz, z, v, retain_graph=True, create_graph=create_graph)
        total = total + vjp.pow(2).sum()
    return total / (num_vectors * z.numel())


@torch.no_grad()
def _normalise(v: Tensor) -> Tensor:
    flat = v.reshape(v.shape[0], -1)
    return (flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)).reshape_as(v)


def spectral_radius(fz: Tensor, z: Tensor, num_iters: int = 50) -> Tensor:
    """Per-sample estimate of |λ_max(∂fz/∂z)| by power iteration on v^T J; returns a (B,) tensor.

    ``fz = f(z)`` must be batch-separable (sample b of fz depends only on sample b of z).
    """
    v = _normalise(torch.randn_like(z))
    eigenvalue = fz.new_zeros(z.shape[0])
    for _ in range(num_iters):
        (vj,) = torch.autograd.grad(fz, z, v, retain_graph=True)
        # Rayleigh quotient v^T J v / v^T v, with ||v|| = 1.
        eigenvalue = (vj * v).reshape(z.shape[0], -1).sum(dim=1)
        v = _normalise(vj)
    return eigenvalue.abs().detach()
