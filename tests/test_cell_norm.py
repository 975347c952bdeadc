"""The MDEQ cell's normalisation switch (MODEL.NORM_TYPE, NORM_LAYERS, torchdeq's norm options): spectral norm's
maths, layout and gradients, which convs each setting covers, and the config checks."""
import re

import pytest
import torch

from deqlab.checkpoint import load_weights
from deqlab.config import load_config
from deqlab.engine import Trainer
from deqlab.errors import ConfigError
from deqlab.layers import NormOptions, SpectralNormConv2d, WeightNormConv2d, reset_per_forward
from deqlab.models import build_model

from conftest import REPO, TINY_OVERRIDES

QUICK = REPO / "experiments/fashion_mnist/cls_mdeq_quickstart.yaml"
CELL_CONVS = {  # conv group -> module names of the tiny 2-branch cell
    "blocks": ["branches.0.blocks.0.conv1", "branches.0.blocks.0.conv2", "branches.1.blocks.0.conv1",
               "branches.1.blocks.0.conv2"],
    "fuse": ["fuse_layers.0.1.net.conv", "fuse_layers.1.0.net.0.conv"],
    "post_fuse": ["post_fuse_layers.0.conv", "post_fuse_layers.1.conv"],
}


def tiny(*overrides):
    return load_config(QUICK, TINY_OVERRIDES + ["TRAIN.PRETRAIN_STEPS", "0", *overrides])


def test_spectral_norm_divides_by_the_largest_singular_value_times_the_learned_scale():
    torch.manual_seed(0)
    conv = SpectralNormConv2d(6, 5, kernel_size=3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight_g.uniform_(0.5, 2.0)
    conv.power_iteration(200)
    w = conv.weight_orig.detach()
    sigma = torch.linalg.matrix_norm(w.flatten(1), ord=2)
    assert torch.allclose(conv.sigma(), sigma, rtol=1e-5)
    assert torch.allclose(conv.weight, w * conv.weight_g / sigma, rtol=1e-5)
    x = torch.randn(2, 6, 7, 7)
    assert torch.allclose(conv(x), torch.nn.functional.conv2d(x, w * conv.weight_g / sigma, padding=1), atol=1e-5)
    # torchdeq's names: a --norm_type spectral_norm state_dict has exactly these
    assert {k: tuple(v.shape) for k, v in conv.state_dict().items()} == {
        "weight_orig": (5, 6, 3, 3), "weight_g": (5, 1, 1, 1), "weight_u": (5,), "weight_v": (54,)}


def test_power_iteration_runs_once_per_training_forward_and_never_in_eval():
    torch.manual_seed(0)
    conv = SpectralNormConv2d(4, 4, kernel_size=1, bias=False,
                              norm_options=NormOptions(power_iters=1))
    conv.weight_u.copy_(torch.nn.functional.normalize(torch.randn(4), dim=0))  # away from the converged vector
    u0 = conv.weight_u.clone()
    conv.eval()
    reset_per_forward(conv)
    assert torch.equal(conv.weight_u, u0)
    conv.train()
    reset_per_forward(conv)
    mat = conv.weight_orig.detach().flatten(1)
    v = torch.nn.functional.normalize(mat.t() @ u0, dim=0)
    assert torch.allclose(conv.weight_u, torch.nn.functional.normalize(mat @ v, dim=0), atol=1e-6)


@pytest.mark.parametrize("cls", [WeightNormConv2d, SpectralNormConv2d])
def test_fixed_target_and_clip_options(cls):
    torch.manual_seed(0)
    fixed = cls(3, 4, kernel_size=3, bias=False, norm_options=NormOptions(learn_scale=False, target_norm=0.7))
    assert "weight_g" not in fixed.state_dict()
    w = fixed.weight.detach()
    norm = (w.flatten(1).norm(dim=1) if cls is WeightNormConv2d
            else torch.linalg.matrix_norm(w.flatten(1), ord=2).expand(4))
    assert torch.allclose(norm, torch.full((4,), 0.7), rtol=1e-3 if cls is SpectralNormConv2d else 1e-6)

    clipped = cls(3, 4, kernel_size=3, bias=False, norm_options=NormOptions(clip=True, clip_value=0.5))
    with torch.no_grad():
        clipped.weight_g.copy_(torch.tensor([0.1, 10.0, 0.2, 20.0]).view(4, 1, 1, 1))
    raw = clipped.raw_weight().detach()
    denom = raw.flatten(1).norm(dim=1).view(4, 1, 1, 1) if cls is WeightNormConv2d else clipped.sigma().detach()
    factor = torch.minimum(clipped.weight_g.detach() / denom, torch.tensor(0.5))
    assert torch.allclose(clipped.weight, raw * factor, rtol=1e-6)


@pytest.mark.parametrize("norm_type, layers", [
    ("auto", None), ("weight_norm", ["blocks", "fuse", "post_fuse"]), ("weight_norm", ["blocks"]),
    ("spectral_norm", ["blocks", "fuse", "post_fuse"]), ("spectral_norm", ["blocks", "post_fuse"]), ("none", None)])
def test_norm_type_and_layers_pick_each_cell_convs_layout(norm_type, layers):
    overrides = ["MODEL.NORM_TYPE", norm_type] + (["MODEL.NORM_LAYERS", str(layers)] if layers else [])
    cell = build_model(tiny(*overrides)).fullstage
    covered = {"auto": ["blocks", "post_fuse"], "none": []}.get(norm_type, layers)
    kind = "weight_norm" if norm_type == "auto" else norm_type
    expected = {"weight_norm": ("weight_g", "weight_v"), "spectral_norm": ("weight_g", "weight_orig", "weight_u",
                                                                           "weight_v"), "none": ("weight",)}
    own = cell.state_dict()
    for group, names in CELL_CONVS.items():
        want = expected[kind if group in covered else "none"]
        for name in names:
            assert tuple(sorted(k[len(name) + 1:] for k in own if k.startswith(name + "."))) == want, name


def test_wnorm_off_with_an_explicit_norm_type_is_a_config_error():
    assert type(build_model(tiny("MODEL.WNORM", "False")).fullstage.post_fuse_layers[0].conv) is torch.nn.Conv2d
    with pytest.raises(ConfigError, match=re.escape("MODEL.NORM_TYPE must be one of auto, none when MODEL.WNORM is "
                                                    "False (not True), got 'spectral_norm'")):
        build_model(tiny("MODEL.WNORM", "False", "MODEL.NORM_TYPE", "spectral_norm"))
    with pytest.raises(ConfigError, match="MODEL.NORM_TYPE must be one of"):
        tiny("MODEL.NORM_TYPE", "batch_norm")
    with pytest.raises(ConfigError, match="MODEL.NORM_LAYERS"):
        tiny("MODEL.NORM_LAYERS", "['blocks', 'head']")
    with pytest.raises(ConfigError, match="MODEL.SN_N_POWER_ITERS"):
        tiny("MODEL.SN_N_POWER_ITERS", "0")


def test_spectral_norm_mdeq_implicit_gradient_matches_finite_differences():
    """float64, eval mode (fixed singular vectors, so the loss is a function of the parameters), tight forward
    and adjoint solves: the IFT gradient along a random direction of the spectral-norm parameters (W and g of
    every cell conv) equals the central difference of the loss."""
    cfg = tiny("MODEL.NORM_TYPE", "spectral_norm", "MODEL.NORM_LAYERS", "['blocks', 'fuse', 'post_fuse']",
               "DEQ.GRAD", "ift", "DEQ.F_SOLVER", "broyden", "DEQ.B_SOLVER",
               "broyden", "DEQ.F_THRES", "80", "DEQ.B_THRES", "80", "DEQ.F_EPS", "1e-13", "DEQ.B_EPS", "1e-13",
               "DEQ.STOP_MODE", "abs")
    torch.manual_seed(0)
    model = build_model(cfg).double().eval()
    with torch.no_grad():  # states near 1 with small variations: the cell contracts and tight solves converge
        for post in model.fullstage.post_fuse_layers:
            post.gnorm.weight.mul_(0.1)
            post.gnorm.bias.fill_(1.0)
    x, c = torch.randn(2, 1, 28, 28, dtype=torch.float64), torch.randn(2, 10, dtype=torch.float64)
    named = {n: p for n, p in model.fullstage.named_parameters() if n.endswith(("weight_orig", "weight_g"))}
    params = list(named.values())
    assert len(params) == 2 * sum(map(len, CELL_CONVS.values()))

    def loss():
        logits, info = model(x)
        assert info["fwd"]["abs_lowest"].max() < 1e-10  # the solve converged: the IFT gradient is exact
        return (logits * c).sum()

    loss().backward()
    # W g / sigma(W) is scale-invariant in W (u, v fixed): no gradient along W. Checked on branch 0's conv2, the one
    # conv that no GroupNorm follows directly (the injection is added first), where only sigma's gradient makes it 0.
    w = named["branches.0.blocks.0.conv2.weight_orig"]
    print(f"cosine(grad, W) of branch 0's conv2: {((w.grad * w).sum() / (w.grad.norm() * w.norm())).item():.3e}")
    assert abs((w.grad * w).sum()) <= 1e-10 * w.grad.norm() * w.norm()
    direction = [torch.randn_like(p) * p.detach().abs().mean() for p in params]  # relative steps of size eps
    analytic = sum((p.grad * d).sum() for p, d in zip(params, direction))
    eps, values = 1e-5, []
    with torch.no_grad():
        for sign in (1, -1):
            for p, d in zip(params, direction):
                p.add_(sign * eps * d)
            values.append(loss())
            for p, d in zip(params, direction):
                p.sub_(sign * eps * d)
    numeric = (values[0] - values[1]) / (2 * eps)
    print(f"directional derivative: ift {analytic.item():.12e}, finite differences {numeric.item():.12e}")
    assert abs(analytic - numeric) <= 1e-7 * abs(numeric), (analytic.item(), numeric.item())


def test_spectral_norm_mdeq_trains_with_the_zoo_phantom_gradient():
    cfg = tiny("MODEL.NORM_TYPE", "spectral_norm", "MODEL.NORM_LAYERS", "['blocks', 'fuse', 'post_fuse']",
               "DEQ.GRAD", "phantom", "DEQ.PHANTOM_STEPS", "5", "DEQ.PHANTOM_TAU", "0.5")
    torch.manual_seed(0)
    model = build_model(cfg).train()
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    conv = model.fullstage.branches[0].blocks[0].conv1
    before = {k: v.clone() for k, v in conv.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    losses = []
    for _ in range(6):
        logits, _ = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    after = conv.state_dict()
    for key in ("weight_orig", "weight_g", "weight_u", "weight_v"):  # trained, and power-iterated each forward
        assert not torch.equal(before[key], after[key]), key


def test_a_spectral_norm_run_saves_weights_that_reload_with_their_singular_vectors(tiny_run):
    path, overrides, _ = tiny_run
    cfg = load_config(path, overrides + ["MODEL.NORM_TYPE", "spectral_norm", "TRAIN.END_EPOCH", "1"])
    trainer = Trainer(cfg, path)
    u_start = trainer.model.fullstage.branches[0].blocks[0].conv1.weight_u.clone()
    metrics = trainer.fit()  # ends by reloading the best weights strictly
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    fresh = build_model(cfg)
    load_weights(fresh, trainer.files.final)
    u_saved = fresh.fullstage.branches[0].blocks[0].conv1.weight_u
    assert torch.equal(u_saved, trainer.model.fullstage.branches[0].blocks[0].conv1.weight_u)
    assert not torch.equal(u_saved, u_start)  # power-iterated during training, and saved
