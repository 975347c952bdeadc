"""DEQ.SPECTRAL_RADIUS_MODE: the estimate at z* against power iteration on the explicit Jacobian, for the
DEQ-Transformer and an MDEQ classifier, and the number in the tools' log lines and CSV rows."""
import csv
import re
import shutil

import pytest
import torch

from conftest import COMPAT, REPO, TINY_OVERRIDES, in_tmp, needs_compat, write_fashion_mnist
from deqlab.checkpoint import save_checkpoint
from deqlab.config import load_config
from deqlab.deq import pack, unpack
from deqlab.engine.evaluator import eval_f_thres, evaluate
from deqlab.engine.launch import load_for_test
from deqlab.tasks import get_task
from deqlab.utils.dist import DistInfo
from test_lm_engine import CFG as LM_CFG, LM_TINY, run

pytestmark = pytest.mark.timeout(400)
CLS_CFG = REPO / "experiments/fashion_mnist/cls_mdeq_quickstart.yaml"
SRADIUS_LINE = re.compile(r"test: spectral radius of df/dz at z\* \(power iteration, mean of the evaluation\): "
                          r"([0-9.]+)")


class DEQProbe:
    """Records, at every call of a model's DEQ layer, its cell f, z* and the RNG state before the call (the
    solvers draw no random numbers, so the spectral-radius estimate's start vector is the next draw)."""

    def __init__(self, deq: torch.nn.Module) -> None:
        self.calls: list[dict] = []
        deq.register_forward_pre_hook(lambda m, args: self.calls.append({"rng": torch.get_rng_state()}))
        deq.register_forward_hook(lambda m, args, out: self.calls[-1].update(f=args[0], z=out[0]))

    def expected(self, call: int, iters: int = 50) -> torch.Tensor:
        """The (B,) |Rayleigh quotients| after ``iters`` power-iteration steps v <- v^T J / ||v^T J|| on each
        sample's explicit Jacobian J of that call's f at z* (built column by column), from the same start vector."""
        rec = self.calls[call]
        flat, layout = pack(rec["z"])
        flat = flat.detach()
        bsz, n = flat.shape

        def g(v: torch.Tensor) -> torch.Tensor:
            return pack(rec["f"](unpack(v.view(bsz, n), layout)), layout)[0].reshape(-1)

        jac = torch.autograd.functional.jacobian(g, flat.reshape(-1), vectorize=True).view(bsz, n, bsz, n)
        torch.set_rng_state(rec["rng"])
        v = torch.randn(bsz, n, dtype=flat.dtype)
        rho = []
        for b in range(bsz):
            j, vb = jac[b, :, b, :], v[b] / v[b].norm()
            for _ in range(iters):
                w = vb @ j
                value = (w @ vb).abs()
                vb = w / w.norm()
            rho.append(value)
        return torch.stack(rho)


def lm_model(overrides):
    cfg = load_config(LM_CFG, LM_TINY + ["DEQ.SPECTRAL_RADIUS_MODE", "True", "DEQ.F_THRES", "20"] + overrides)
    task = get_task("lm", cfg)
    torch.manual_seed(0)
    return task, task.build_model()


def cls_model(overrides):
    cfg = load_config(CLS_CFG, TINY_OVERRIDES + ["DEQ.SPECTRAL_RADIUS_MODE", "True"] + overrides)
    task = get_task("cls", cfg)
    torch.manual_seed(0)
    return task, task.build_model()


@needs_compat
def test_lm_estimate_is_power_iteration_on_the_explicit_jacobian(tmp_path):
    shutil.copytree(COMPAT / "deq_transformer" / "corpus", tmp_path / "data" / "austen")
    task, model = lm_model(in_tmp([], tmp_path))
    model = model.double().eval()
    probe = DEQProbe(model.deq)
    (data, target), _ = next(iter(task.build_loader("test", distributed=False)))
    with torch.no_grad():
        _, mems, first = model(data, target, train_step=-1)
        second = model(data, target, mems=mems, train_step=-1)[2]  # with memory: f depends on it
        pretraining = model(data, target, train_step=0)[2]
    assert pretraining["sradius"] is None  # no equilibrium in the unrolled pretraining forward: nothing to report
    assert first["sradius"].shape == (data.shape[1],)
    for call, info in enumerate((first, second)):
        torch.testing.assert_close(info["sradius"], probe.expected(call), rtol=1e-7, atol=0)
        assert info["sradius"].min() > 0.05  # a real contraction factor, not a zero default


def test_mdeq_classifier_estimate_is_power_iteration_on_the_explicit_jacobian(tmp_path):
    # NCHW: the probe draws the same start vector in the flat state's order, which follows the memory layout
    task, model = cls_model(in_tmp(["MODEL.CHANNELS_LAST", "False"], tmp_path))
    model = model.double().eval()
    probe = DEQProbe(model.deq)
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))  # 768 states
    with torch.no_grad():
        _, info = model(x, train_step=-1)
        unrolled = model(x, train_step=0)[1]
    assert unrolled["sradius"] is None
    torch.testing.assert_close(info["sradius"], probe.expected(0), rtol=1e-7, atol=0)
    assert info["sradius"].min() > 0.05


def tool_reports_the_estimate(tool, cfg_path, task_name, overrides, tmp):
    """Run ``tool`` on a fresh model's checkpoint with --results_name; its log line and CSV column must carry the
    mean over the evaluated samples of the explicit-Jacobian power iteration (same model, batches, start vectors)."""
    overrides = overrides + ["DEQ.SPECTRAL_RADIUS_MODE", "True", "TEST.MODEL_FILE", str(tmp / "model.pth")]
    cfg = load_config(cfg_path, overrides)
    task = get_task(task_name, cfg, full_test=True)
    torch.manual_seed(cfg.SEED)
    save_checkpoint(tmp / "model.pth", {"model": task.build_model().state_dict()})
    proc = run([f"tools/{tool}", "--cfg", cfg_path, "--results_name", tmp / "rows.csv", *overrides], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = SRADIUS_LINE.findall(proc.stdout)
    (row,) = list(csv.DictReader((tmp / "rows.csv").open()))
    # the tool's evaluation, repeated here with a probe on the DEQ layer (load_for_test seeds as the tool does)
    model, loader = load_for_test(task, "test", DistInfo(0, 1, 0, torch.device("cpu")))
    probe = DEQProbe(model.deq)
    evaluate(task, model, loader, torch.device("cpu"), f_thres=eval_f_thres(cfg))
    expected = torch.cat([probe.expected(i) for i in range(len(probe.calls))]).mean().item()
    assert len(logged) == 1 and float(logged[0]) == pytest.approx(expected, rel=1e-3)  # printed with 4 decimals
    assert float(row["sradius"]) == pytest.approx(expected, rel=1e-4)
    return float(row["sradius"])


@needs_compat
def test_lm_eval_logs_and_writes_the_spectral_radius(tmp_path):
    shutil.copytree(COMPAT / "deq_transformer" / "corpus", tmp_path / "data" / "austen")
    overrides = in_tmp(LM_TINY + ["LM.MAX_EVAL_STEPS", "2", "DEQ.F_THRES", "20"], tmp_path)
    assert tool_reports_the_estimate("lm_eval.py", LM_CFG, "lm", overrides, tmp_path) > 0.05


def test_cls_valid_logs_and_writes_the_spectral_radius(tmp_path):
    write_fashion_mnist(tmp_path / "data", n_train=2, n_test=2)
    overrides = in_tmp(TINY_OVERRIDES + ["TEST.BATCH_SIZE_PER_GPU", "1", "MODEL.IMAGE_SIZE", "[16, 16]"], tmp_path)
    assert tool_reports_the_estimate("cls_valid.py", CLS_CFG, "cls", overrides, tmp_path) > 0.05
