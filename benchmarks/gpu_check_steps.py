"""``gpu_check.py``'s training-step checks: AMP gradients against fp32 per task, gradient mode and dtype, and the
speed switches (channels-last, the compiled cell) against the default, on the three quickstart models."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpu_check_common import compared, flat_grads, rel_diff, row

REPO = Path(__file__).resolve().parents[1]
# The quickstart models: small enough for a CPU, every code path of the full-size ones.
CONFIGS = {"cls": "experiments/fashion_mnist/cls_mdeq_quickstart.yaml",
           "seg": "experiments/fashion_scenes/seg_mdeq_quickstart.yaml",
           "lm": "experiments/austen/deq_transformer_quickstart.yaml"}
# Every solve spends its whole budget and nothing is random, so the runs compared differ only by rounding.
EXACT = ["TRAIN.PRETRAIN_STEPS", "0", "MODEL.DROPOUT", "0.0", "DEQ.F_EPS", "0.0", "DEQ.B_EPS", "0.0",
         "DEQ.RAND_F_THRES_DELTA", "0"]
BATCH = {"cls": 16, "seg": 2, "lm": 4}
LM_TOKENS, LM_LEN = 4000, 16  # above the quickstart's cutoffs [1000, 3000]; short segments and memory
AFTER_PRETRAINING = 10**9  # the ``train_step`` of a DEQ-phase step
MODES = ("ift", "phantom", "unrolled")
DTYPES = ("float16", "bfloat16")
WARMUP_STEPS = 5  # fp32 Adam steps on the batch first: at init the loss is flat and its gradient mostly noise
# AMP error caps, in units of the rounding floor (the gradient's change when only the weights and the input are
# rounded to the AMP dtype, computed in fp32). Autocast rounds every op's inputs, so it lands a floor or two off:
# measured on the CPU, the largest over the tasks and both dtypes, ift 1.9, phantom 1.8, unrolled 1.8 floors.
# The caps leave 2x for other kernels (cuDNN, cuBLAS); unrolled gets more, as it backpropagates through all
# F_THRES half-precision steps where ift (an fp32 adjoint solve on one half-precision VJP per step) and phantom
# (k damped steps) differentiate fewer.
AMP_CAP = {"ift": 4.0, "phantom": 4.0, "unrolled": 5.0}
# Whatever the floor, a gradient half its own size off fp32's is wrong (a lost term, a bad scale): the cap's ceiling.
AMP_MAX_REL = 0.5
# The speed switches reorder float32 sums only: their outputs and gradients match the default's to round-off,
# amplified by the solve's conditioning (measured on the CPU: channels-last ≤ 3.5e-6; the compiled seg cell's
# phantom gradient 1.0e-4, its output 1.9e-6), 100x below the AMP floors, so a real difference still fails.
SAME_TOL = 1e-3
MAX_SCALER_BACKOFFS = 24  # GradScaler starts at 2^16 and halves per overflow


@dataclass
class Problem:
    """A model, a fixed batch and its loss: ``output(model, round_to)`` runs the forward (the input rounded to
    ``round_to`` if given), ``loss(output)`` the task's loss."""
    cfg: Any
    model: nn.Module
    output: Callable[[nn.Module, torch.dtype | None], Tensor]
    loss: Callable[[Tensor], Tensor]


def build(task: str, device: torch.device, *overrides: str) -> Problem:
    """``task``'s quickstart model (seed 0) in train mode with a fixed random batch (seed 1) on ``device``."""
    from deqlab.config import load_config
    from deqlab.models import build_model
    from deqlab.tasks import get_task

    cfg = load_config(REPO / CONFIGS[task], [*EXACT, *overrides])
    torch.manual_seed(0)
    model = build_model(cfg, task=task, **({"n_token": LM_TOKENS} if task == "lm" else {})).to(device).train()
    gen = torch.Generator().manual_seed(1)
    n = BATCH[task]
    if task == "lm":
        tokens = torch.randint(0, LM_TOKENS, (2 * LM_LEN + 1, n), generator=gen).to(device)
        data, target = tokens[LM_LEN:2 * LM_LEN], tokens[LM_LEN + 1:]
        with torch.no_grad():  # a full memory, as every segment after the first has
            mems = [m.detach() for m in model(tokens[:LM_LEN], tokens[1:LM_LEN + 1], mems=None,
                                               train_step=AFTER_PRETRAINING)[1]]
        return Problem(cfg, model, lambda m, _: m(data, target, mems=mems, train_step=AFTER_PRETRAINING)[0],
                       lambda nll: nll.float().mean())
    if task == "cls":
        w, h = cfg.MODEL.IMAGE_SIZE
        x = torch.randn(n, cfg.MODEL.IN_CHANNELS, h, w, generator=gen)
        y = torch.randint(0, cfg.MODEL.NUM_CLASSES, (n,), generator=gen)
    else:
        w, h = cfg.TRAIN.IMAGE_SIZE
        x = torch.randn(n, cfg.MODEL.IN_CHANNELS, h, w, generator=gen)
        y = torch.randint(0, cfg.DATASET.NUM_CLASSES, (n, h, w), generator=gen)
    x, y = x.to(device), y.to(device)
    criterion = get_task(task, cfg).loss

    def output(m: nn.Module, round_to: torch.dtype | None) -> Tensor:
        return m(x if round_to is None else x.to(round_to).float(), train_step=AFTER_PRETRAINING)[0]
    return Problem(cfg, model, output, lambda out: criterion(out.float(), y))


def fp32_grads(problem: Problem, model: nn.Module, round_to: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """(output, gradient) of one fp32 forward and backward of ``model``."""
    model.zero_grad(set_to_none=True)
    out = problem.output(model, round_to)
    problem.loss(out).backward()
    return out.detach(), flat_grads(model)


def warm_up(problem: Problem) -> None:
    """A few fp32 Adam steps on the batch, so that the gradients compared carry signal."""
    optimizer = torch.optim.Adam(problem.model.parameters(), lr=1e-3)
    for _ in range(WARMUP_STEPS):
        fp32_grads(problem, problem.model)
        optimizer.step()


def rounding_floor(problem: Problem, dtype: torch.dtype, g32: Tensor) -> float:
    """How much the fp32 gradient ``g32`` moves when the weights and the input are rounded to ``dtype``: the
    least any computation in ``dtype`` can be off by."""
    model = problem.model
    # in place and back (weight-normed modules cannot be deep-copied)
    kept = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).float())
    try:
        return rel_diff(fp32_grads(problem, model, dtype)[1], g32)
    finally:
        with torch.no_grad():
            for p, k in zip(model.parameters(), kept):
                p.copy_(k)


def amp_grads(problem: Problem, dtype: str, device: torch.device) -> tuple[float, Tensor, int]:
    """(loss, unscaled gradient, overflow back-offs) of a step under deqlab's AMP (its autocast and, for float16,
    its GradScaler, as the Trainer runs them): overflowing steps are retried at the halved scale, as the scaler
    skips them in training."""
    from deqlab.config import load_config
    from deqlab.engine.evaluator import autocast_context, grad_scaler

    amp = load_config(None, ["AMP.ENABLED", "True", "AMP.DTYPE", dtype])
    scaler = grad_scaler(amp, device)
    model = problem.model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # for the scaler's bookkeeping; never changes a weight
    for backoffs in range(MAX_SCALER_BACKOFFS):
        model.zero_grad(set_to_none=True)
        with autocast_context(amp, device):
            loss = problem.loss(problem.output(model, None))
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grads = flat_grads(model)
        if not scaler.is_enabled() or torch.isfinite(grads).all():
            return loss.item(), grads, backoffs
        scaler.step(optimizer)  # skipped: the gradients are not finite
        scaler.update()
    return loss.item(), grads, MAX_SCALER_BACKOFFS


def amp_checks(device: torch.device, tasks: tuple[str, ...] = tuple(CONFIGS)) -> list[dict]:
    """Per task and gradient mode: fp16 (with GradScaler) and bf16 steps against fp32 at the same warmed-up weights;
    the loss must be finite and the gradient within ``AMP_CAP[mode]`` rounding floors of fp32's."""
    rows = []
    for task in tasks:
        for mode in MODES:
            problem = build(task, device, "DEQ.GRAD", mode)
            warm_up(problem)
            _, g32 = fp32_grads(problem, problem.model)
            for dtype in DTYPES:
                name = f"amp/{task}/{mode}/{dtype}"
                floor = rounding_floor(problem, getattr(torch, dtype), g32)
                loss, grads, backoffs = amp_grads(problem, dtype, device)
                err = rel_diff(grads, g32)
                why = (f"‖g−g32‖/‖g32‖ ≤ floor {floor:.1e} × cap {AMP_CAP[mode]:g} (≤ {AMP_MAX_REL}); cos "
                       f"{F.cosine_similarity(grads.double(), g32.double(), 0).item():.4f}; loss {loss:.4f}")
                if backoffs:
                    why += f"; {backoffs} scaler back-offs"
                if not torch.isfinite(torch.tensor(loss)):
                    rows.append(row(name, device.type, "fail", loss, "finite", "non-finite loss"))
                else:
                    rows.append(compared(name, device.type, err, min(AMP_CAP[mode] * floor, AMP_MAX_REL), why))
    return rows


# The speed switches against NCHW eager (MODEL.CHANNELS_LAST's default, "auto", is NHWC on the CPU, so the
# baseline names its layout); the DEQ-Transformer has no convolutions, so no channels-last.
NCHW = ["MODEL.CHANNELS_LAST", "False"]
SWITCHES = {"channels_last": (("cls", "seg"), ["MODEL.CHANNELS_LAST", "True"]),
            "compile": (("cls", "seg", "lm"), ["MODEL.COMPILE", "True"])}


# A cold inductor compile of an MDEQ cell takes 15-30 s on an idle 2-core CPU (80 s on a busy one), beyond the
# CPU mode's budget; tests/test_fast_paths.py checks the compiled MDEQ cell on the CPU instead. --full runs them.
CPU_BUDGET_SKIPS = {"compile/cls", "compile/seg"}


def switch_checks(device: torch.device, full: bool = False) -> list[dict]:
    """Outputs and gradients of a train-mode step with each speed switch equal NCHW eager's to round-off."""
    rows = []
    for switch, (tasks, overrides) in SWITCHES.items():
        for task in tasks:
            name = f"{switch}/{task}"
            if device.type == "cpu" and not full and name in CPU_BUDGET_SKIPS:
                rows.append(row(name, device.type, "n/a", reason="CPU budget: a cold compile takes 15-30 s; "
                                "tests/test_fast_paths.py covers it on the CPU, --full runs it here"))
                continue
            default, fast = build(task, device, *NCHW), build(task, device, *NCHW, *overrides)
            fast.model.load_state_dict(default.model.state_dict())
            out0, g0 = fp32_grads(default, default.model)
            out1, g1 = fp32_grads(fast, fast.model)
            out_err, grad_err = rel_diff(out1, out0), rel_diff(g1, g0)
            rows.append(compared(name, device.type, max(out_err, grad_err), SAME_TOL,
                                 f"max of output {out_err:.1e} and gradient {grad_err:.1e} relative differences"))
    return rows
