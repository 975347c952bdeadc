"""Solvers on problems whose fixed point is known: linear maps (solved densely) and contractive tanh cells."""
import pytest
import torch

from deqlab.solvers import SOLVERS, get_solver, register_solver

QUASI_NEWTON = ["broyden", "anderson"]
ALL = QUASI_NEWTON + ["fixed_point"]


def linear_problem(b=4, n=32, norm=0.9, seed=0, dtype=torch.float64):
    """f(z) = A z + c per sample, ||A||₂ = norm; fixed point z* = (I − A)^{-1} c."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(b, n, n, generator=g, dtype=dtype)
    a = a * norm / torch.linalg.matrix_norm(a, ord=2)[:, None, None]
    c = torch.randn(b, n, generator=g, dtype=dtype)
    z_star = torch.linalg.solve(torch.eye(n, dtype=dtype) - a, c)
    return (lambda z: torch.bmm(a, z.unsqueeze(2)).squeeze(2) + c), z_star


@pytest.mark.parametrize("name", ALL)
def test_linear_fixed_point_matches_a_dense_solve(name):
    f, z_star = linear_problem()
    z, stats = get_solver(name)(f, torch.zeros_like(z_star), max_iter=400, tol=1e-10, stop_mode="abs")
    assert stats["converged"] and not stats["nonfinite"]
    assert torch.allclose(z, z_star, atol=1e-9, rtol=0)
    assert float(stats["abs_lowest"].max()) < 1e-10


@pytest.mark.parametrize("name", QUASI_NEWTON)
def test_quasi_newton_beats_plain_iteration_on_a_slow_contraction(name):
    g = torch.Generator().manual_seed(1)
    q = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))[0]
    a = q @ torch.diag(torch.linspace(0.0, 0.98, 32, dtype=torch.float64)) @ q.T  # spectral radius 0.98
    c = torch.randn(4, 32, generator=g, dtype=torch.float64)
    z_star = torch.linalg.solve(torch.eye(32, dtype=torch.float64) - a, c.T).T
    f = lambda z: z @ a.T + c  # noqa: E731
    _, picard = get_solver("fixed_point")(f, torch.zeros_like(z_star), max_iter=300, tol=1e-8, stop_mode="abs")
    opts = {"m": 10} if name == "anderson" else {}
    z, fast = get_solver(name)(f, torch.zeros_like(z_star), max_iter=300, tol=1e-8, stop_mode="abs", **opts)
    assert fast["converged"] and torch.allclose(z, z_star, atol=1e-7)
    assert not picard["converged"] and fast["nfe"] * 3 < picard["nfe"]


def test_anderson_reaches_tiny_residuals_in_float64():
    """The Gram-scaled regulariser keeps Anderson converging far below where a fixed λ stalls."""
    f, z_star = linear_problem(n=64, norm=0.95, seed=2)
    z, stats = get_solver("anderson")(f, torch.zeros_like(z_star), max_iter=300, tol=1e-12, stop_mode="abs", m=6)
    assert stats["converged"] and float(stats["abs_lowest"].max()) < 1e-12
    assert torch.allclose(z, z_star, atol=1e-11, rtol=0)


@pytest.mark.parametrize("name", ALL)
def test_tanh_cell_with_image_shaped_state(name):
    """Trailing shapes are preserved, and the answer satisfies z = f(z) to the requested tolerance."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 4, generator=g) * 0.3
    x = torch.randn(2, 4, 5, 5, generator=g)
    f = lambda z: torch.tanh(torch.einsum("ij,bjhw->bihw", w, z) + x)  # noqa: E731
    z, stats = get_solver(name)(f, torch.zeros_like(x), max_iter=100, tol=1e-5, stop_mode="rel")
    assert z.shape == x.shape
    rel = (f(z) - z).flatten(1).norm(dim=1) / f(z).flatten(1).norm(dim=1)
    assert stats["converged"] and rel.max() < 1e-5
    assert stats["rel_trace"].shape == (stats["nfe"],)  # one residual per f evaluation


@pytest.mark.parametrize("memory", [3, 8])
def test_limited_memory_broyden_still_converges(memory):
    f, z_star = linear_problem(norm=0.9, seed=4)
    z, stats = get_solver("broyden")(f, torch.zeros_like(z_star), max_iter=300, tol=1e-9, stop_mode="abs",
                                     memory=memory)
    assert stats["converged"] and torch.allclose(z, z_star, atol=1e-8)


def test_returns_the_lowest_residual_iterate_per_sample():
    """Sample 0 diverges (f(z) = 2z + 1), sample 1 converges: each gets its own best iterate (fixed-point
    iteration returns that iterate's image, as torchdeq's does)."""
    scale = torch.tensor([[2.0], [0.5]], dtype=torch.float64)
    f = lambda z: scale * z + 1  # noqa: E731
    z, stats = get_solver("fixed_point")(f, torch.zeros(2, 3, dtype=torch.float64), max_iter=12, tol=1e-12,
                                         stop_mode="abs")
    assert torch.equal(z[0], torch.ones(3, dtype=torch.float64))  # z0 had the lowest residual, |1|: f(z0) = 1
    assert torch.allclose(z[1], torch.full((3,), 2.0, dtype=torch.float64), atol=1e-3)
    assert not stats["converged"] and stats["nfe"] == stats["nstep"] == 12


@pytest.mark.parametrize("name", ALL)
def test_a_nan_stops_the_solve_and_keeps_the_last_finite_best(name):
    calls = []

    def f(z):
        calls.append(1)
        return torch.full_like(z, float("nan")) if len(calls) > 3 else 0.5 * torch.tanh(z) + 1

    z, stats = get_solver(name)(f, torch.zeros(2, 4), max_iter=50, tol=1e-12, stop_mode="abs")
    assert stats["nonfinite"] and not stats["converged"]
    assert len(calls) == 4 and torch.isfinite(z).all()


@pytest.mark.parametrize("name", ALL)
def test_autograd_flows_through_an_unrolled_solve(name):
    """With grad enabled the solvers are differentiable; compare with finite differences in float64."""
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(5, 5, generator=g, dtype=torch.float64) * 0.2).requires_grad_()
    x = torch.randn(3, 5, generator=g, dtype=torch.float64)

    def run(w):
        return get_solver(name)(lambda z: torch.tanh(z @ w.T + x), torch.zeros_like(x), max_iter=6, tol=0.0,
                                stop_mode="abs")[0]

    assert torch.autograd.gradcheck(run, (w,), eps=1e-6, atol=1e-7)


def test_bad_arguments_name_what_was_expected():
    f = lambda z: z  # noqa: E731
    z0 = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="stop_mode"):
        get_solver("anderson")(f, z0, stop_mode="max")
    with pytest.raises(ValueError, match="max_iter"):
        get_solver("broyden")(f, z0, max_iter=0)
    with pytest.raises(ValueError, match="tau"):
        get_solver("fixed_point")(f, z0, tau=1.5)
    with pytest.raises(ValueError, match="known solvers: anderson, broyden, fixed_point"):
        get_solver("newton")


def test_register_solver_makes_a_new_solver_available_by_name():
    @register_solver("halving")
    def halving(f, z0, max_iter=30, tol=1e-3, stop_mode="rel"):
        return 0.5 * z0, {"nstep": 0}

    try:
        assert get_solver("halving") is halving
    finally:
        SOLVERS.pop("halving")
