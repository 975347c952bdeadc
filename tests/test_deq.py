"""The DEQ layer's gradients against gradcheck, a dense adjoint solve and unrolled backprop (float64)."""
import pytest
import torch

from deqlab.deq import DEQ, pack, unpack
from deqlab.regularizers import jacobian_frobenius_loss, spectral_radius

B, D = 3, 8
TIGHT = dict(f_max_iter=300, b_max_iter=300, f_tol=1e-13, b_tol=1e-13, stop_mode="abs")


def make_problem(seed: int = 0, norm: float = 0.6):
    """z = tanh(W z + U x): contractive because ||W||_2 = norm < 1 and tanh is 1-Lipschitz."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D, D, generator=g, dtype=torch.float64)
    w = (w * norm / torch.linalg.matrix_norm(w, ord=2)).requires_grad_()
    u = torch.randn(D, D, generator=g, dtype=torch.float64).requires_grad_()
    x = torch.randn(B, D, generator=g, dtype=torch.float64).requires_grad_()
    return w, u, x


def cell(w, u, x):
    return lambda z: torch.tanh(z @ w.T + x @ u.T)


def solve(deq, w, u, x, z0=None):
    z0 = torch.zeros(B, D, dtype=torch.float64) if z0 is None else z0
    return deq(cell(w, u, x), z0)


# Anderson's tight solves make the full element-by-element check cost half a minute: for it, gradcheck's fast
# mode compares the same finite differences along random directions of the inputs and outputs.
@pytest.mark.parametrize("solver,fast_mode", [("broyden", False), ("anderson", True), ("fixed_point", False)])
def test_ift_gradient_passes_gradcheck(solver, fast_mode):
    w, u, x = make_problem()
    deq = DEQ(f_solver=solver, b_solver=solver, grad="ift", **TIGHT)
    assert torch.autograd.gradcheck(lambda w, u, x: solve(deq, w, u, x)[0], (w, u, x), eps=1e-6, atol=1e-6,
                                    fast_mode=fast_mode)


def dense_adjoint_grads(w, u, x, c):
    """dL/dθ for L = <c, z*> from (I - J)^T g = c solved densely per sample, then g^T ∂f/∂θ."""
    with torch.no_grad():
        z = torch.zeros(B, D, dtype=torch.float64)
        for _ in range(500):
            z = torch.tanh(z @ w.T + x @ u.T)
    z = z.requires_grad_()
    fz = torch.tanh(z @ w.T + x @ u.T)
    jac = (1 - fz.detach() ** 2).unsqueeze(2) * w.detach()  # (B, D, D): J_b = diag(1 - f^2) W
    eye = torch.eye(D, dtype=torch.float64)
    g = torch.linalg.solve((eye - jac).transpose(1, 2), c.unsqueeze(2)).squeeze(2)
    return torch.autograd.grad(fz, (w, u, x), g)


def test_ift_gradient_matches_dense_adjoint():
    w, u, x = make_problem(seed=1)
    c = torch.randn(B, D, dtype=torch.float64)
    deq = DEQ(f_solver="broyden", b_solver="anderson", grad="ift", **TIGHT)
    z, info = solve(deq, w, u, x)
    grads = torch.autograd.grad((z * c).sum(), (w, u, x))
    for got, want in zip(grads, dense_adjoint_grads(w, u, x, c)):
        assert torch.linalg.norm(got - want) <= 1e-6 * torch.linalg.norm(want)
    assert info["bwd"]["nstep"] > 1 and float(info["bwd"]["abs_lowest"].max()) < 1e-10


def test_unrolled_gradient_equals_backprop_through_the_same_iterations():
    w, u, x = make_problem(seed=2)
    k = 7
    deq = DEQ(f_solver="fixed_point", grad="unrolled", f_max_iter=k, f_tol=0.0, stop_mode="abs")
    z, info = solve(deq, w, u, x)
    assert info["fwd"]["nstep"] == info["fwd"]["nfe"] == k
    # Fixed-point iteration returns the image of the lowest-residual iterate (torchdeq's choice); on this
    # contraction that is the last one measured, z_{k-1}, so the answer is z_k = f^k(0): k evaluations.
    z_ref = torch.zeros(B, D, dtype=torch.float64)
    for _ in range(k):
        z_ref = torch.tanh(z_ref @ w.T + x @ u.T)
    assert torch.allclose(z, z_ref, atol=0, rtol=1e-14)
    c = torch.randn(B, D, dtype=torch.float64)
    got = torch.autograd.grad((z * c).sum(), (w, u, x))
    want = torch.autograd.grad((z_ref * c).sum(), (w, u, x))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_phantom_gradient_approaches_ift_as_steps_grow():
    w, u, x = make_problem(seed=3, norm=0.8)
    c = torch.randn(B, D, dtype=torch.float64)
    ift = DEQ(f_solver="anderson", b_solver="anderson", grad="ift", **TIGHT)
    z, _ = solve(ift, w, u, x)
    want = torch.autograd.grad((z * c).sum(), w)[0]
    errors = []
    for k in (1, 4, 16, 64):
        deq = DEQ(f_solver="anderson", grad="phantom", phantom_steps=k, phantom_tau=1.0, **TIGHT)
        z, _ = solve(deq, w, u, x)
        got = torch.autograd.grad((z * c).sum(), w)[0]
        errors.append(float(torch.linalg.norm(got - want) / torch.linalg.norm(want)))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 1e-2 and errors[-1] < 1e-5, errors


def test_fixed_depth_applies_f_exactly_n_times():
    w, u, x = make_problem(seed=4)
    deq = DEQ(grad="ift")
    z, info = deq(cell(w, u, x), torch.zeros(B, D, dtype=torch.float64), fixed_depth=3)
    z_ref = torch.zeros(B, D, dtype=torch.float64)
    for _ in range(3):
        z_ref = torch.tanh(z_ref @ w.T + x @ u.T)
    assert torch.equal(z, z_ref) and info["fwd"] is None and z.requires_grad


def test_list_states_round_trip_and_match_the_flat_problem():
    states = [torch.randn(2, 3, 4, 4), torch.randn(2, 5)]
    flat, shapes = pack(states)
    assert flat.shape == (2, 3 * 16 + 5)
    assert all(torch.equal(a, b) for a, b in zip(unpack(flat, shapes), states))

    # The same fixed-point problem written on a list [first 3 dims, last 5 dims] and on one tensor.
    w, u, x = make_problem(seed=5)
    f_flat = cell(w, u, x)

    def f_list(zs):
        out = f_flat(torch.cat(zs, dim=1))
        return [out[:, :3], out[:, 3:]]

    c = torch.randn(B, D, dtype=torch.float64)
    deq = DEQ(f_solver="broyden", b_solver="broyden", grad="ift", **TIGHT)
    z_list, _ = deq(f_list, [torch.zeros(B, 3, dtype=torch.float64), torch.zeros(B, 5, dtype=torch.float64)])
    assert [t.shape for t in z_list] == [(B, 3), (B, 5)]
    g_list = torch.autograd.grad((torch.cat(z_list, 1) * c).sum(), w)[0]
    z_flat, _ = solve(deq, w, u, x)
    g_flat = torch.autograd.grad((z_flat * c).sum(), w)[0]
    assert torch.allclose(torch.cat(z_list, 1), z_flat, atol=1e-12)
    assert torch.allclose(g_list, g_flat, rtol=1e-9, atol=1e-12)


def test_warm_start_from_the_equilibrium_needs_few_steps():
    w, u, x = make_problem(seed=6)
    deq = DEQ(f_solver="broyden", grad="ift", f_max_iter=100, f_tol=1e-10, stop_mode="abs")
    with torch.no_grad():
        z, cold = solve(deq, w, u, x)
        _, warm = solve(deq, w, u, x, z0=z)
    assert warm["fwd"]["nstep"] < cold["fwd"]["nstep"] and warm["fwd"]["nstep"] <= 2


def test_nonfinite_cell_is_reported_and_never_returned():
    w, u, x = make_problem(seed=7)
    calls = {"n": 0}

    def f(z):
        calls["n"] += 1
        out = torch.tanh(z @ w.T + x @ u.T)
        return out * float("nan") if calls["n"] > 3 else out

    deq = DEQ(f_solver="broyden", grad="ift", f_max_iter=30, f_tol=1e-12)
    with torch.no_grad():
        z, info = deq(f, torch.zeros(B, D, dtype=torch.float64))
    assert info["fwd"]["nonfinite"] is True
    assert torch.isfinite(z).all()


def test_unknown_solver_or_gradient_mode_fails_with_the_choices():
    with pytest.raises(ValueError, match="broyden"):
        DEQ(f_solver="newton")
    with pytest.raises(ValueError, match="ift, phantom, unrolled"):
        DEQ(grad="backprop")


def test_jacobian_frobenius_estimate_is_unbiased_on_a_linear_map():
    torch.manual_seed(0)
    a = torch.randn(D, D, dtype=torch.float64)
    z = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    fz = z @ a.T
    exact = B * torch.linalg.matrix_norm(a) ** 2 / z.numel()  # ||J||_F^2 over the batch, per element
    estimate = jacobian_frobenius_loss(fz, z, num_vectors=4000, create_graph=False)
    assert abs(float(estimate / exact) - 1) < 0.05


def test_jacobian_loss_is_differentiable_through_the_deq():
    w, u, x = make_problem(seed=8)
    deq = DEQ(f_solver="anderson", grad="ift", **TIGHT)
    _, info = deq(cell(w, u, x), torch.zeros(B, D, dtype=torch.float64), compute_jac_loss=True)
    (grad_w,) = torch.autograd.grad(info["jac_loss"], w)
    assert info["jac_loss"] > 0 and torch.linalg.norm(grad_w) > 0


def test_spectral_radius_of_a_symmetric_linear_map():
    q, _ = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64))
    eig = torch.linspace(-0.3, 0.9, D, dtype=torch.float64)
    a = q @ torch.diag(eig) @ q.T
    z = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    rho = spectral_radius(z @ a.T, z, num_iters=300)
    assert rho.shape == (B,)
    assert torch.allclose(rho, torch.full((B,), 0.9, dtype=torch.float64), atol=1e-3)


@pytest.mark.parametrize("grad", ["ift", "phantom"])
def test_under_autocast_f_runs_in_bf16_and_the_solver_in_fp32(grad):
    torch.manual_seed(0)
    lin = torch.nn.Linear(D, D)
    x = torch.randn(B, D)
    seen = []

    def f(z):
        out = lin(z)
        seen.append(out.dtype)
        return torch.tanh(0.5 * out + x)

    deq = DEQ(f_solver="broyden", b_solver="anderson", grad=grad, f_max_iter=20, f_tol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, info = deq(f, torch.zeros(B, D))
    assert torch.bfloat16 in seen and z.dtype == torch.float32
    assert info["fwd"]["rel_lowest"].dtype == torch.float32 and info["fwd"]["rel_lowest"].max() < 1e-2
    z.sum().backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


@pytest.mark.parametrize("solver", ["broyden", "anderson", "fixed_point"])
def test_backward_solve_skips_the_vjp_at_zero_and_changes_no_iterate(solver):
    """The adjoint map at g = 0 is dL/dz* itself: one VJP fewer than f evaluations, and the same gradient as
    the backward solve run on the plain VJP map from zeros. B_THRES 12 is 13 evaluations for Broyden (12 steps
    after g0) and 12 for Anderson and fixed-point iteration."""
    nfe = {"broyden": 13, "anderson": 12, "fixed_point": 12}[solver]
    w, u, x = make_problem(seed=2)
    c = torch.randn(B, D, dtype=torch.float64)
    deq = DEQ(f_solver="broyden", b_solver=solver, grad="ift", f_max_iter=300, b_max_iter=12, f_tol=1e-13,
              b_tol=0.0, stop_mode="abs")
    calls = []

    def counted(z):
        z = z.view_as(z)
        if z.requires_grad:
            z.register_hook(lambda g: calls.append(1))  # fires once per VJP with respect to the state
        return cell(w, u, x)(z)

    z, info = deq(counted, torch.zeros(B, D, dtype=torch.float64))
    grads = torch.autograd.grad((z * c).sum(), (w, u, x))
    assert info["bwd"]["nfe"] == nfe and info["bwd"]["vjp_evals"] == nfe - 1
    assert len(calls) == nfe - 1

    # The reference: the same solver on a copy of its zero start, so every step takes the full VJP path.
    reference = DEQ(f_solver="broyden", b_solver=solver, grad="ift", f_max_iter=300, b_max_iter=12, f_tol=1e-13,
                    b_tol=0.0, stop_mode="abs")
    plain = reference.b_solver
    reference.b_solver = lambda f, z0, **kw: plain(f, z0.clone(), **kw)
    z_ref, info_ref = reference(cell(w, u, x), torch.zeros(B, D, dtype=torch.float64))
    for got, want in zip(grads, torch.autograd.grad((z_ref * c).sum(), (w, u, x))):
        assert torch.equal(got, want)
    assert info_ref["bwd"]["vjp_evals"] == nfe
