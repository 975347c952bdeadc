"""Weight norm and variational dropout: one weight and one mask per forward pass, shared by all solver steps."""
import pytest
import torch

from deqlab.deq import DEQ
from deqlab.layers import VariationalDropout2d, WeightNormConv2d, reset_per_forward


def test_weight_norm_stores_g_and_v_and_computes_the_normalised_weight():
    torch.manual_seed(0)
    conv = WeightNormConv2d(3, 5, kernel_size=3, padding=1, bias=False)
    assert set(conv.state_dict()) == {"weight_g", "weight_v"}
    assert conv.weight_g.shape == (5, 1, 1, 1)
    with torch.no_grad():
        conv.weight_g.mul_(torch.arange(1.0, 6.0).reshape(5, 1, 1, 1))
    norms = conv.weight.flatten(1).norm(dim=1)
    assert torch.allclose(norms, conv.weight_g.flatten(), rtol=1e-6)
    x = torch.randn(2, 3, 6, 6)
    assert torch.allclose(conv(x), torch.nn.functional.conv2d(x, conv.compute_weight(), padding=1), atol=1e-6)


def test_weight_is_computed_once_per_forward_and_trains_g_and_v():
    torch.manual_seed(0)
    conv = WeightNormConv2d(4, 4, kernel_size=3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight_v.mul_(0.3)  # make z ↦ tanh(conv(z) + x) contractive
    seen = []
    conv.register_forward_pre_hook(lambda m, _: seen.append(id(m.weight)))
    x = torch.randn(2, 4, 5, 5)
    deq = DEQ(f_solver="anderson", grad="ift", f_max_iter=20, f_tol=1e-6)
    for _ in range(2):
        reset_per_forward(conv)
        z, info = deq(lambda z: torch.tanh(conv(z) + x), torch.zeros_like(x))
        z.square().sum().backward()
    per_forward = len(seen) // 2
    assert per_forward > 3  # many solver steps...
    assert len(set(seen[:per_forward])) == 1 and len(set(seen[per_forward:])) == 1  # ...one weight each
    assert seen[0] != seen[-1]  # recomputed at the next forward
    assert conv.weight_g.grad.abs().sum() > 0 and conv.weight_v.grad.abs().sum() > 0


def test_variational_dropout_mask_is_fixed_within_a_forward_and_redrawn_after_reset():
    torch.manual_seed(0)
    drop = VariationalDropout2d(0.5).train()
    x = torch.ones(64, 8, 3, 3)
    first, second = drop(x), drop(2 * x)
    assert torch.equal(first * 2, second)  # same mask on every call (every solver step)
    per_channel = first[:, :, :1, :1]
    assert torch.equal(first, per_channel.expand_as(first))  # same mask at every pixel
    assert set(per_channel.unique().tolist()) == {0.0, 2.0}  # kept units scaled by 1/(1-p)
    assert abs(float(first.mean()) - 1.0) < 0.1  # unbiased
    reset_per_forward(drop)
    assert not torch.equal(drop(x), first)
    assert torch.equal(drop.eval()(x), x)


def test_a_cell_with_variational_dropout_still_converges():
    torch.manual_seed(0)
    drop = VariationalDropout2d(0.3).train()
    w = torch.randn(6, 6) * 0.1
    x = torch.randn(4, 6, 1, 1, dtype=torch.float64)
    w = w.double()
    f = lambda z: torch.tanh(drop(torch.einsum("ij,bjhw->bihw", w, z)) + x)  # noqa: E731
    _, info = DEQ(f_solver="fixed_point", f_max_iter=100, f_tol=1e-10, stop_mode="abs")(f, torch.zeros_like(x))
    assert info["fwd"]["abs_lowest"].max() < 1e-10


def test_dropout_rate_is_validated():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        VariationalDropout2d(1.0)
