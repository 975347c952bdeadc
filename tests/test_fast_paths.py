"""The speed switches change no result: channels-last states and weights (MODEL.CHANNELS_LAST) and their
flattening, and mixed precision on the CPU (AMP.ENABLED, bfloat16 and float16)."""
import math

import pytest
import torch

from deqlab.checkpoint import load_weights, save_checkpoint
from deqlab.config import load_config
from deqlab.deq import DEQ, is_channels_last, pack, unpack
from deqlab.engine import Trainer
from deqlab.errors import ConfigError
from deqlab.models import build_model

from conftest import REPO, SEG_TINY_OVERRIDES, TINY_OVERRIDES

CLS_CFG = REPO / "experiments/fashion_mnist/cls_mdeq_quickstart.yaml"
NHWC = torch.channels_last


def test_channels_last_states_flatten_in_memory_order_without_a_copy():
    a = torch.randn(2, 3, 4, 5).contiguous(memory_format=NHWC)
    b = torch.randn(2, 6)
    flat, layout = pack(a)
    assert layout.channels_last == (True,) and flat.data_ptr() == a.data_ptr()  # a view: no copy
    assert torch.equal(flat, a.permute(0, 2, 3, 1).reshape(2, -1))
    back = unpack(flat, layout)
    assert torch.equal(back, a) and is_channels_last(back)
    flat, layout = pack([a, b])
    assert layout.channels_last == (True, False) and flat.shape == (2, 60 + 6)
    assert all(torch.equal(x, y) for x, y in zip(unpack(flat, layout), [a, b]))
    # with a layout given, an NCHW tensor is flattened in the recorded (NHWC) order: f(z) matches z
    again, _ = pack([a.contiguous(), b], layout)
    assert torch.equal(again, flat)
    assert not is_channels_last(torch.randn(2, 1, 4, 4).contiguous(memory_format=NHWC))  # both: NCHW wins


def test_the_solve_is_the_same_in_either_layout():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1).double()
    with torch.no_grad():
        conv.weight.mul_(0.3)
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    f = lambda z: torch.tanh(conv(z) + x)  # noqa: E731
    deq = DEQ(f_solver="broyden", f_max_iter=40, f_tol=1e-12, stop_mode="abs")
    z0 = torch.zeros_like(x)
    z_nchw, info_a = deq(f, z0)
    z_nhwc, info_b = deq(f, z0.contiguous(memory_format=NHWC))
    assert is_channels_last(z_nhwc) and info_a["fwd"]["nstep"] == info_b["fwd"]["nstep"]
    assert torch.allclose(z_nchw, z_nhwc, atol=1e-12)


def tiny(*overrides):
    cfg = load_config(CLS_CFG, TINY_OVERRIDES + ["DEQ.F_EPS", "0", *overrides])
    torch.manual_seed(0)
    return build_model(cfg, "cls"), cfg


def test_a_channels_last_mdeq_equals_the_nchw_one_forward_and_backward(tmp_path):
    plain, _ = tiny("MODEL.CHANNELS_LAST", "False")
    fast, _ = tiny("MODEL.CHANNELS_LAST", "True")
    convs = [p for n, p in fast.named_parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] > 1]
    assert convs and all(p.is_contiguous(memory_format=NHWC) for p in convs)
    for (name, a), (_, b) in zip(plain.named_parameters(), fast.named_parameters()):
        assert torch.equal(a, b), name  # same seed, same weights: the layout is taken after the init
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    grads = []
    for model in (plain, fast):
        model.train()
        logits, info = model(x, train_step=10)
        loss = torch.nn.functional.cross_entropy(logits, y)
        grads.append((loss, torch.autograd.grad(loss, list(model.parameters())), info["bwd"]["nstep"]))
    (la, ga, na), (lb, gb, nb) = grads
    assert na == nb and torch.allclose(la, lb, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(ga, gb))  # float32 round-off
    # a channels-last checkpoint loads into an NCHW model (and the other way round) with the same outputs
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_checkpoint(tmp_path / "cl.pth", {"model": fast.state_dict()})
    load_weights(plain, tmp_path / "cl.pth")
    plain.eval(), fast.eval()
    with torch.no_grad():
        assert torch.allclose(plain(x)[0], fast(x)[0], atol=1e-6)
    assert all(p.is_contiguous(memory_format=NHWC) for p in convs)  # loading keeps a model's own layout


@pytest.mark.parametrize("task", ["cls", "seg"])
def test_the_layouts_agree_to_float64_round_off_on_both_gradient_paths(task):
    """In float64 NHWC and NCHW give the same logits and cell gradients, unrolled and at the equilibrium (float32
    round-off alone can reach 3e-4 relative in random-init cell gradients, where the sums cancel heavily)."""
    path, overrides, shape = (CLS_CFG, TINY_OVERRIDES, (2, 1, 28, 28)) if task == "cls" else (
        REPO / "experiments/cityscapes/seg_mdeq_SMALL.yaml", SEG_TINY_OVERRIDES, (2, 3, 32, 64))
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    results = []
    for layout in ("False", "True"):
        cfg = load_config(path, overrides + ["DEQ.F_EPS", "0", "DEQ.B_EPS", "0", "MODEL.CHANNELS_LAST", layout])
        torch.manual_seed(0)
        model = build_model(cfg, task).double().train()
        assert model.channels_last == (layout == "True")
        cell = [p for n, p in model.named_parameters() if n.startswith("fullstage.")]
        for train_step in (0, 10**6):  # unrolled pretraining, then the DEQ path (implicit backward)
            out = model(x, train_step=train_step)[0]
            results.append((layout, out, torch.autograd.grad(out.square().mean(), cell)))
    nchw, nhwc = results[:2], results[2:]
    for (_, out_a, grads_a), (_, out_b, grads_b) in zip(nchw, nhwc):
        torch.testing.assert_close(out_b, out_a, rtol=1e-10, atol=1e-12)
        for a, b in zip(grads_a, grads_b):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-13)
    assert any(g.abs().max() > 0 for g in nchw[1][2])  # the implicit backward reached the cell


def test_channels_last_auto_is_nhwc_on_the_cpu_only():
    auto, cfg = tiny()
    assert cfg.MODEL.CHANNELS_LAST == "auto" and auto.channels_last  # DEVICE auto resolves to the CPU here
    assert tiny("DEVICE", "cpu")[0].channels_last
    # a CUDA run keeps NCHW (the model is built on the CPU, then moved): the choice follows DEVICE, not CUDA's presence
    assert not tiny("DEVICE", "cuda")[0].channels_last
    assert not tiny("DEVICE", "cpu", "MODEL.CHANNELS_LAST", "False")[0].channels_last
    with pytest.raises(ConfigError, match="MODEL.CHANNELS_LAST must be one of auto, True, False, got 'yes'"):
        tiny("MODEL.CHANNELS_LAST", "yes")


def test_cpu_mixed_precision_runs_the_cell_in_bfloat16_and_trains(tiny_run):
    path, overrides, _ = tiny_run
    losses = {}
    for amp in ("False", "True"):
        cfg = load_config(path, overrides + ["AMP.ENABLED", amp, "TRAIN.PRETRAIN_STEPS", "0", "DEQ.GRAD", "ift",
                                             "TRAIN.LR", "0.01", "TRAIN.LR_SCHEDULER", "constant"])
        trainer = Trainer(cfg, path)
        dtypes = set()
        conv = trainer.model.fullstage.branches[0].blocks[0].conv1
        conv.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
        x, y = next(iter(trainer.train_loader))
        losses[amp] = [trainer.train_step(x, y)["loss"] for _ in range(15)]
        assert dtypes == ({torch.bfloat16} if amp == "True" else {torch.float32})
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    # fifteen steps on one batch (2.27 at the start, measured 1.15 in fp32 and 1.09 in bf16): both fit it alike
    assert losses["True"][-1] < 0.6 * losses["True"][0] and losses["False"][-1] < 0.6 * losses["False"][0]
    assert losses["True"][-1] == pytest.approx(losses["False"][-1], rel=0.15)


def test_float16_on_the_cpu_trains_with_the_cpu_gradient_scaler(tiny_run):
    """float16 autocast and GradScaler("cpu") exist on the CPU (torch >= 2.3), so AMP.DTYPE float16 is not refused
    there: the cell runs in float16, the scaler is on, and the first steps overflow at its initial scale of 2^16
    and are skipped by the scaler, as on CUDA, until the scale fits."""
    path, overrides, _ = tiny_run
    cfg = load_config(path, overrides + ["AMP.ENABLED", "True", "AMP.DTYPE", "float16", "TRAIN.PRETRAIN_STEPS", "0",
                                         "DEQ.GRAD", "ift", "TRAIN.LR", "0.01", "TRAIN.LR_SCHEDULER", "constant"])
    trainer = Trainer(cfg, path)
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() == 2.0 ** 16
    dtypes = set()
    conv = trainer.model.fullstage.branches[0].blocks[0].conv1
    conv.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
    x, y = next(iter(trainer.train_loader))
    losses = [trainer.train_step(x, y)["loss"] for _ in range(12)]
    assert dtypes == {torch.float16} and all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert trainer.scaler.get_scale() < 2.0 ** 16  # it backed off after overflows ...
    assert all(map(math.isfinite, losses)) and losses[-1] < 0.8 * losses[0]  # ... and the steps that fit trained


def test_a_compiled_cell_gives_the_eager_results_and_trains_alike(tmp_path):
    """MODEL.COMPILE: the forward solver's no-grad iterations run compiled, the graph-building application and
    its VJPs eagerly; outputs, gradients, a few Adam steps and checkpoints are those of the eager model. (One
    test: each compile of the cell costs most of a minute here.)"""
    eager, _ = tiny("MODEL.DROPOUT", "0.0")
    compiled, _ = tiny("MODEL.DROPOUT", "0.0", "MODEL.COMPILE", "True")
    assert list(eager.state_dict()) == list(compiled.state_dict())  # the runner is not a submodule
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    compiled.train()
    compiled(x, train_step=0)  # pretraining: f applied with autograd only, so nothing is compiled
    assert compiled.cell._compiled is None
    losses: dict[str, list[float]] = {"eager": [], "compiled": []}
    first = {}  # each model's first step: loss, gradients, DEQ info
    for name, model in (("eager", eager), ("compiled", compiled)):
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        for step in range(6):
            logits, info = model(x, train_step=10)
            loss = torch.nn.functional.cross_entropy(logits, y)
            grads = torch.autograd.grad(loss, list(model.parameters()))
            first.setdefault(name, (loss, grads, info))
            for param, grad in zip(model.parameters(), grads):
                param.grad = grad
            optimizer.step()
            losses[name].append(loss.item())
    (la, ga, ia), (lb, gb, ib) = first["eager"], first["compiled"]
    assert ia["fwd"]["nstep"] == ib["fwd"]["nstep"] and ia["bwd"]["nstep"] == ib["bwd"]["nstep"]
    assert torch.allclose(la, lb, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-3) for a, b in zip(ga, gb))  # float32 round-off
    assert compiled.cell._compiled is not None
    assert losses["compiled"][-1] < 0.8 * losses["compiled"][0]
    # the same steps up to float32 round-off, amplified over the Adam steps
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=0.02)
    save_checkpoint(tmp_path / "c.pth", {"model": compiled.state_dict()})
    load_weights(eager, tmp_path / "c.pth")
    eager.eval(), compiled.eval()
    with torch.no_grad():
        assert torch.allclose(eager(x)[0], compiled(x)[0], atol=1e-5)


def test_a_compiled_deq_transformer_cell_gives_the_eager_loss():
    from deqlab.models import DEQTransformerLM

    def lm(compile):
        torch.manual_seed(0)
        return DEQTransformerLM(n_token=40, n_layer=2, eval_n_layer=2, n_head=2, d_model=16, d_head=8, d_inner=32,
                                dropout=0.0, dropatt=0.0, tgt_len=6, mem_len=6, pretrain_steps=0, f_thres=8,
                                b_thres=8, f_eps=0.0, compile=compile)

    data, target = torch.randint(0, 40, (6, 3)), torch.randint(0, 40, (6, 3))
    eager, compiled = lm(False), lm(True)
    outputs = []
    for model in (eager, compiled):
        model.eval()
        with torch.no_grad():
            loss, mems, _ = model(data, target)
            loss2, _, _ = model(data, target, mems)  # with a memory: a new shape, compiled again
        outputs.append((loss, loss2))
    assert compiled.cell._compiled is not None
    for a, b in zip(*outputs):
        assert torch.allclose(a, b, atol=1e-5)
