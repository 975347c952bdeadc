"""The DEQ layer: find z* = f(z*) with a solver, then attach a gradient without storing the solve.

Forward. Given a cell f (closing over the input x and the parameters), a quasi-Newton solver finds the
equilibrium z* = f(z*) under ``torch.no_grad()``: the forward costs one solve and no activation memory.

Backward (``grad="ift"``). Differentiating z* = f(z*, θ) gives dz*/dθ = (I − J)^{-1} ∂f/∂θ with
J = ∂f/∂z at z*. For a loss L the vector-Jacobian form is the *adjoint equation*

    g = g J + dL/dz*,        dL/dθ = g ∂f/∂θ,

a linear fixed-point problem in g that the backward solver solves with one vector-Jacobian product per
step, on a graph of a single application of f at z*. Memory stays that of one f, whatever the number of
forward or backward steps. Implementation: the layer returns f(z*) computed with autograd from a detached
z* and registers a hook on it that replaces the incoming gradient dL/dz* by the solution g.

Phantom gradient (``grad="phantom"``, Geng et al., NeurIPS 2021). From z*, take k damped steps
z ← τ f(z) + (1 − τ) z under autograd and backprop through them. It approximates (I − J)^{-1} by a truncated,
damped Neumann series: cheap (k VJPs, no solve), memory grows with k, and it acts as a regulariser. k = 1,
τ = 1 is the Jacobian-free gradient (Fung et al., 2022). Use it when the backward solve is expensive or the
forward solve is rough (few steps), where the IFT gradient is inexact anyway.

Unrolled (``grad="unrolled"``). Backprop through every step of the forward solver: exact for what was
computed, memory grows with the number of steps. The ALL_UNROLLED baseline of Ramzi et al. (2023).

Fixed depth. No solver: f applied N times from z0 under autograd, with ``fixed_depth=N``, or as the layer's
pretraining rule decides from the forward's ``train_step`` (``pretrain_steps``, ``pretrain_depth``,
``all_unrolled``; see :meth:`DEQ.unrolled_depth`): both originals pretrain the cell unrolled before switching to
the equilibrium.

Predicted initial state, Skip DEQ (Pal, Edelman & Rackauckas, 2022; ``z0_predicted=True``). The caller passes
z0 = g(x) computed with autograd by any predictor: an explicit shallow net (Skip DEQ) or one application of
the cell from zeros, f(0; x) (Skip DEQ V2 / SkipRegDEQ). The layer does not need to know which. Every mode
(solver, unrolled, fixed depth) starts from ``z0.detach()``, so the task loss never reaches the predictor
through the solve, and when z0 carries a graph the layer returns the regulariser

    info["skip_loss"] = mean((z0 − sg(z*))²)       (sg: stop-gradient; mean over every state element)

with z* the solver's equilibrium (the fixed-depth output when unrolling). Its gradient reaches only what
computed z0: an explicit predictor learns from it alone, the DEQ parameters from the task loss alone (for
f(0; x) the cell is the predictor, so it gets both). The caller weights it and adds it to its loss. A predicted
state is kept in at least float32 (a predictor under autocast returns half precision). Without a graph (eval,
``torch.no_grad()``) the solve still starts from z0 and ``info["skip_loss"]`` is None.

Spectral radius (a layer built with ``spectral_radius=True``, a diagnostic). In eval mode
``info["sradius"]`` = per-sample |λ_max| of J = ∂f/∂z at the solver's z*, by 50 steps of power iteration on
v ↦ vᵀJ (``deqlab.regularizers.spectral_radius``: 50 VJPs on one graph of f); None in training, when not asked
for or at a fixed depth (no equilibrium), as in both originals.

Phantom trajectory (``trajectory_every=k``, ``grad="phantom"``). ``info["trajectory"]`` lists every k-th of
the damped phantom iterates, each with its graph, and always the last (which is the returned state): the
fixed-point correction loss (``deqlab.objective.fixed_point_correction``, Geng et al. 2021 / torchdeq's
``fp_correction``) applies the task loss to each. None in any other mode or when k is 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from deqlab.regularizers import jacobian_frobenius_loss, spectral_radius as power_iteration
from deqlab.solvers import get_solver, memory_options
from deqlab.solvers.common import check_args

States = Tensor | Sequence[Tensor]
GRAD_MODES = ("ift", "phantom", "unrolled")


def mean_spectral_radius(info: dict[str, Any]) -> float | None:
    """The batch mean of ``info["sradius"]`` (a DEQ call's per-sample estimates); None when there is none."""
    sradius = info.get("sradius")
    return None if sradius is None else float(sradius.float().mean())


@dataclass(frozen=True)
class Layout:
    """How :func:`pack` flattened a state: each tensor's shape, whether it was flattened in channels-last
    order, and whether the state was a single tensor (rather than a list)."""
    shapes: tuple[torch.Size, ...]
    channels_last: tuple[bool, ...]
    single: bool


def is_channels_last(t: Tensor) -> bool:
    """A 4-D tensor stored channels-last (NHWC memory order; a tensor that is both counts as NCHW)."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def pack(states: States, layout: Layout | None = None) -> tuple[Tensor, Layout]:
    """Flatten a tensor or list of (B, ...) tensors into one (B, N) tensor; return it and its :class:`Layout`.

    A channels-last state is flattened in its memory order (N, H, W, C), which needs no copy; the solvers'
    norms and inner products do not depend on the order. Pass the ``layout`` of an earlier pack to flatten
    in that order whatever the tensors' strides: f(z) must be flattened exactly as z was.
    """
    single = isinstance(states, Tensor)
    states = [states] if single else list(states)
    if layout is None:
        layout = Layout(tuple(s.shape for s in states), tuple(is_channels_last(s) for s in states), single)
    flat = [(s.permute(0, 2, 3, 1) if nhwc else s).reshape(s.shape[0], -1)
            for s, nhwc in zip(states, layout.channels_last)]
    return (flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)), layout


def unpack(flat: Tensor, layout: Layout) -> States:
    """Inverse of :func:`pack` (views of ``flat``): channels-last states come back as NCHW-shaped views of
    their NHWC memory."""
    sizes = [s[1:].numel() for s in layout.shapes]
    out = []
    for chunk, shape, nhwc in zip(flat.split(sizes, dim=1), layout.shapes, layout.channels_last):
        if nhwc:
            b, c, h, w = shape
            out.append(chunk.reshape(b, h, w, c).permute(0, 3, 1, 2))
        else:
            out.append(chunk.reshape(shape))
    return out[0] if layout.single else out


class DEQ(nn.Module):
    """Solve for z* = f(z*) and differentiate through it (see the module docstring for the modes).

    ``z_star, info = deq(f, z0)``: ``f`` maps a state (tensor or list of tensors, batch first) to one of the
    same structure; ``z0`` is the initial state (warm start welcome). ``info["fwd"]`` holds the forward
    solver's stats; ``info["bwd"]`` is filled in by the backward solve when ``grad="ift"``;
    ``info["skip_loss"]`` (``z0_predicted=True``) and ``info["trajectory"]`` (``trajectory_every``) are
    described in the module docstring (None when not asked for).
    """

    def __init__(
        self,
        f_solver: str = "broyden",
        b_solver: str = "broyden",
        f_max_iter: int = 30,
        b_max_iter: int = 40,
        f_tol: float = 1e-3,
        b_tol: float = 1e-6,
        stop_mode: str = "rel",
        grad: str = "ift",
        phantom_steps: int = 5,
        phantom_tau: float = 0.5,
        f_solver_options: dict[str, Any] | None = None,
        b_solver_options: dict[str, Any] | None = None,
        f_solver_memory: int = 0,
        b_solver_memory: int = 0,
        spectral_radius: bool = False,
        pretrain_steps: int = 0,
        pretrain_depth: int = 5,
        eval_pretrain_depth: int | None = None,
        all_unrolled: bool = False,
        pretrain_jac_loss: bool = True,
    ) -> None:
        """Solvers, budgets (``max_iter``, in each solver's units), tolerances and gradient mode as in the module
        docstring; ``*_solver_memory``: past iterates the solver keeps (0: its default).

        ``spectral_radius``: estimate ρ(∂f/∂z) at z* in every eval-mode forward (``info["sradius"]``).
        Unrolling: a forward with ``0 <= train_step < pretrain_steps``, or every forward with ``all_unrolled``,
        applies f ``pretrain_depth`` times instead of solving; ``eval_pretrain_depth`` (default
        ``pretrain_depth``) is the depth in eval mode at ``train_step`` 0 (the DEQ-Transformer's
        ``eval_n_layer``). ``pretrain_jac_loss``: whether ``compute_jac_loss`` also applies when unrolled.
        """
        super().__init__()
        if grad not in GRAD_MODES:
            raise ValueError(f"unknown gradient mode grad={grad!r}; expected one of {', '.join(GRAD_MODES)}")
        if grad == "phantom" and (phantom_steps < 1 or not 0.0 < phantom_tau <= 1.0):
            raise ValueError(f"grad='phantom' needs phantom_steps >= 1 and 0 < phantom_tau <= 1, got {phantom_steps} "
                             f"and {phantom_tau}")
        check_args(f_max_iter, f_tol, stop_mode)
        check_args(b_max_iter, b_tol, stop_mode)
        self.f_solver, self.b_solver = get_solver(f_solver), get_solver(b_solver)
        self.f_solver_name, self.b_solver_name = f_solver, b_solver
        self.f_max_iter, self.b_max_iter = f_max_iter, b_max_iter
        self.f_tol, self.b_tol = f_tol, b_tol
        self.stop_mode, self.grad = stop_mode, grad
        self.phantom_steps, self.phantom_tau = phantom_steps, phantom_tau
        self.f_solver_options = {**memory_options(f_solver, f_solver_memory), **(f_solver_options or {})}
        self.b_solver_options = {**memory_options(b_solver, b_solver_memory), **(b_solver_options or {})}
        self.spectral_radius = spectral_radius
        self.pretrain_steps, self.all_unrolled = pretrain_steps, all_unrolled
        self.pretrain_depth = pretrain_depth
        self.eval_pretrain_depth = pretrain_depth if eval_pretrain_depth is None else eval_pretrain_depth
        self.pretrain_jac_loss = pretrain_jac_loss

    def extra_repr(self) -> str:
        return (f"f_solver={self.f_solver_name}, b_solver={self.b_solver_name}, f_max_iter={self.f_max_iter}, "
                f"b_max_iter={self.b_max_iter}, stop_mode={self.stop_mode}, grad={self.grad}")

    def unrolled_depth(self, train_step: int = -1) -> int | None:
        """How many times a forward at ``train_step`` applies f instead of solving; None: it solves.

        Both originals pretrain with ``0 <= train_step < pretrain_steps`` in any mode. The eval-mode depth at
        step 0 is the DEQ-Transformer's rule (``n_layer if self.training or train_step > 0 else eval_n_layer``):
        its training script validates with the current step, so later validations use ``pretrain_depth``.
        """
        if not (self.all_unrolled or 0 <= train_step < self.pretrain_steps):
            return None
        return self.pretrain_depth if self.training or train_step > 0 else self.eval_pretrain_depth

    def forward(
        self,
        f: Callable[[States], States],
        z0: States,
        *,
        train_step: int = -1,
        f_max_iter: int | None = None,
        fixed_depth: int | None = None,
        compute_jac_loss: bool = False,
        z0_predicted: bool = False,
        trajectory_every: int = 0,
    ) -> tuple[States, dict[str, Any]]:
        """Return ``(z_star, info)``: f unrolled at ``train_step`` (:meth:`unrolled_depth`) or
        ``fixed_depth=N`` times, else solved.

        ``compute_jac_loss``: ``info["jac_loss"]`` (not when unrolled without ``pretrain_jac_loss``).
        ``z0_predicted``: z0 comes from a predictor (Skip DEQ): start from ``z0.detach()`` and, when z0 has a
        graph, return ``info["skip_loss"]``. ``trajectory_every=k`` (phantom gradient): return every k-th
        phantom iterate, and the last, in ``info["trajectory"]``.
        """
        if fixed_depth is None:
            fixed_depth = self.unrolled_depth(train_step)
        compute_jac_loss = compute_jac_loss and (fixed_depth is None or self.pretrain_jac_loss)
        z0_flat, layout = pack(z0)
        predicted = None  # the predicted z0 with its graph, when there is one to regularise
        if z0_predicted:
            z0_flat = z0_flat.to(torch.promote_types(z0_flat.dtype, torch.float32))
            if z0_flat.requires_grad and torch.is_grad_enabled():
                predicted = z0_flat
            z0_flat = z0_flat.detach()
        dtype = z0_flat.dtype

        # Under autocast, f runs in mixed precision but the solver runs with autocast off, on states kept in
        # z0's dtype (fp32): residual norms and quasi-Newton updates need the precision.
        device_type = z0_flat.device.type
        amp = torch.is_autocast_enabled(device_type)
        amp_dtype = torch.get_autocast_dtype(device_type)

        def f_flat(z: Tensor) -> Tensor:
            with torch.autocast(device_type, dtype=amp_dtype, enabled=amp):
                return pack(f(unpack(z, layout)), layout)[0].to(dtype)

        info: dict[str, Any] = {"fwd": None, "bwd": {}, "jac_loss": None, "skip_loss": None, "trajectory": None,
                                "sradius": None}
        graph = None  # (f(z*), z*) with autograd, when the ift gradient built it
        if fixed_depth is not None:
            z = z0_flat
            for _ in range(fixed_depth):
                z = f_flat(z)
            out = z_star = z
        elif self.grad == "unrolled" and torch.is_grad_enabled():
            out, info["fwd"] = self._solve(f_flat, z0_flat, f_max_iter)
            z_star = out
        else:
            with torch.no_grad():
                z_star, info["fwd"] = self._solve(f_flat, z0_flat.detach(), f_max_iter)
            out = z_star
            if torch.is_grad_enabled():
                out, graph, trajectory = self._attach_gradient(f_flat, z_star, info, trajectory_every)
                if trajectory is not None:
                    info["trajectory"] = [unpack(t, layout) for t in trajectory]
        if predicted is not None:
            info["skip_loss"] = (predicted.float() - z_star.detach().float()).pow(2).mean()
        if compute_jac_loss and torch.is_grad_enabled():
            if graph is None:
                z_in = out.detach().requires_grad_()
                graph = (f_flat(z_in), z_in)
            info["jac_loss"] = jacobian_frobenius_loss(*graph)
        if self.spectral_radius and not self.training and fixed_depth is None:
            with torch.enable_grad():  # evaluation runs under no_grad; the VJPs need one graph of f at z*
                z_in = z_star.detach().requires_grad_()
                info["sradius"] = power_iteration(f_flat(z_in), z_in)
        return unpack(out, layout), info

    def _solve(self, f_flat: Callable[[Tensor], Tensor], z0: Tensor, max_iter: int | None):
        with torch.autocast(z0.device.type, enabled=False):
            return self.f_solver(f_flat, z0, max_iter=max_iter or self.f_max_iter, tol=self.f_tol,
                                 stop_mode=self.stop_mode, **self.f_solver_options)

    def _attach_gradient(self, f_flat: Callable[[Tensor], Tensor], z_star: Tensor, info: dict,
                         trajectory_every: int = 0
                         ) -> tuple[Tensor, tuple[Tensor, Tensor] | None, list[Tensor] | None]:
        """Return the differentiable output, for ift the one-step graph (f(z*), z*), and for phantom with
        ``trajectory_every`` k > 0 every k-th iterate and the last (None otherwise)."""
        if self.grad == "phantom":
            z, trajectory = z_star, []
            for step in range(1, self.phantom_steps + 1):
                z = self.phantom_tau * f_flat(z) + (1.0 - self.phantom_tau) * z
                if trajectory_every > 0 and (step % trajectory_every == 0 or step == self.phantom_steps):
                    trajectory.append(z)
            return z, None, trajectory if trajectory_every > 0 else None
        # ift: f(z*) with autograd from a detached z*; the hook swaps dL/dz* for the adjoint solution g.
        z_in = z_star.detach().requires_grad_()
        fz = f_flat(z_in)

        def adjoint_hook(grad: Tensor | None) -> Tensor | None:
            if grad is None:  # no gradient reached z*: nothing to solve
                return None

            g0 = torch.zeros_like(grad)
            g0_version, vjps = g0._version, [0]

            def vjp_step(g: Tensor) -> Tensor:
                # The adjoint map is affine, g ↦ g J + dL/dz*: at the solver's untouched initial g = 0 it is
                # dL/dz* with no VJP (every solver evaluates its z0 first), which saves one VJP per solve and
                # changes no iterate.
                if g.data_ptr() == g0.data_ptr() and g.numel() == g0.numel() and g0._version == g0_version:
                    return grad.clone()
                vjps[0] += 1
                return torch.autograd.grad(fz, z_in, g, retain_graph=True)[0] + grad

            with torch.autocast(grad.device.type, enabled=False):
                g, stats = self.b_solver(vjp_step, g0, max_iter=self.b_max_iter,
                                         tol=self.b_tol, stop_mode=self.stop_mode, **self.b_solver_options)
            info["bwd"].update(stats, vjp_evals=vjps[0])
            return g

        if not fz.requires_grad:
            return fz, (fz, z_in), None
        # The hook goes on a view of f(z*), not on f(z*) itself: the VJPs inside it differentiate f(z*), and
        # a hook there would fire again on each of them.
        out = fz.view_as(fz)
        out.register_hook(adjoint_hook)
        return out, (fz, z_in), None
