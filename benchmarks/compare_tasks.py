"""``compare_original.py --task seg|lm``: the segmentation and DEQ-Transformer train steps against the originals.

``seg``: MDEQ-SMALL segmentation (``experiments/cityscapes/seg_mdeq_SMALL.yaml``, the same file in locuslab/mdeq
and here), dropout off, on a ``--crop`` random image with random labels (a band of ignored pixels), the
class-weighted cross-entropy of each side (theirs: ``core.seg_criterion.CrossEntropy``). ``lm``: the
DEQ-Transformer of ``experiments/austen/deq_transformer_quickstart.yaml`` (d_model 128, 4 heads, d_inner 512,
adaptive embedding and softmax, weight norm, 2 cells while pretraining), dropout off, a ``N_TOKEN``-token vocabulary,
``--batch`` streams of ``--tgt-len`` random tokens after a full memory of random states, against locuslab/deq's
``DEQ-Sequence/models/deq_transformer.py`` built with the same arguments. Every step: forward + loss + backward
+ Adam. Budgets are the originals' thresholds t at F_THRES = B_THRES = t: seg Broyden both ways (t + 1
evaluations each), lm Anderson forward (t) and Broyden backward (t + 1), as ``wt103_deq_transformer.sh``.

Both sides load the same weights (ours at seed 0, saved by the check and loaded by every timed process: the
state-dict layouts are the same but for the originals' aliases). Before timing, a check process builds both and
asserts equal losses on the same batch: the unrolled (solver-free) training loss and the DEQ loss at the budget.
For lm a second check (``CONVERGED``, once per run) asserts equal DEQ-path cell gradients where both sides' solves
converge, which at the budget they do not.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import originals

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"seg": "experiments/cityscapes/seg_mdeq_SMALL.yaml",
           "lm": "experiments/austen/deq_transformer_quickstart.yaml"}
SOLVERS = {"seg": ("broyden", "broyden"), "lm": ("anderson", "broyden")}  # the originals' forward, backward
N_TOKEN = 5000  # above the quickstart's adaptive cutoffs (1000, 3000)
# Our variants per task: the default (the original's algorithms) and the f/VJP floor (fixed-point iteration
# both ways at the same f evaluations); seg also channels-last, the MDEQ cells' faster layout.
FLOOR = ["DEQ.F_SOLVER", "fixed_point", "DEQ.B_SOLVER", "fixed_point"]
# seg's "ours" is the default layout (MODEL.CHANNELS_LAST auto: NHWC on the CPU); ours_nchw names the other one
VARIANTS = {"seg": {"ours": [], "ours_nchw": ["MODEL.CHANNELS_LAST", "False"], "floor": FLOOR},
            "lm": {"ours": [], "floor": FLOOR}}
# Equal weights, equal batch: the relative differences asserted before timing (float32 round-off; at the
# budget the forward solves take the same steps, but at this random init they do not converge and round-off
# grows over the steps, hence the looser bound). The DEQ path's cell gradients are reported, not asserted: the
# backward solves do not converge at this init and the two keep different iterates (locuslab/mdeq keeps the one
# of lowest absolute residual over the batch, its zero initial guess included, so its cell can get no gradient
# at all; ours the lowest relative residual per sample).
TOLERANCE = {("unrolled", "loss"): 1e-5, ("unrolled", "grad"): 1e-4, ("deq", "loss"): 1e-3}
# lm's converged check. At the random init the cell is barely contractive (spectral radius of ∂f/∂z ≈ 0.97 at
# z*), the adjoint system is ill-conditioned, and the budget's non-converged solves give gradients that differ by
# 20-100% between the sides (the forward Anderson solvers differ: our regulariser is scaled to the Gram matrix,
# theirs is a fixed 1e-4; the backward Broyden keeps the lowest residual per sample here, per batch there).
# With the cell's weight-norm gains scaled by ``gain`` (radius ≈ 0.95), in float64, Broyden both ways (the
# original's Anderson stalls near a 1e-4 residual there, its fixed regulariser then dominating) to ``eps``
# relative, both sides converge and their cell gradients must agree to ``tolerance``.
CONVERGED = {"gain": 0.1, "eps": 1e-10, "thres": 100, "tolerance": 1e-4}
CELLS = {"seg": "fullstage.", "lm": "func."}  # the DEQ cell's parameters
TRAIN_STEP = 10**9  # past any pretraining: the DEQ path


@dataclass
class Built:
    """A model and its training loss on the fixed batch: ``loss(train_step)``; ``evals()``: the f evaluations
    (forward, backward) of the last step, read after its backward."""
    model: torch.nn.Module
    loss: Callable[[int], torch.Tensor]
    evals: Callable[[], tuple[int, int]]


def at_original_budget(config: str, overrides: Sequence[str], f_thres: int, original_solvers: Sequence[str]) -> Any:
    """Our ``config`` with ``overrides``, its F_THRES / B_THRES set so that each solve spends the f evaluations the
    original's (forward, backward) solvers spend at threshold ``f_thres`` (``deqlab.solvers.budget_for_evals``)."""
    from deqlab.config import load_config
    from deqlab.solvers import budget_for_evals, max_evals

    solvers = load_config(REPO / config, overrides).DEQ
    f_evals, b_evals = (max_evals(name, f_thres) for name in original_solvers)
    return load_config(REPO / config, [*overrides, "DEQ.F_THRES", str(budget_for_evals(solvers.F_SOLVER, f_evals)),
                                       "DEQ.B_THRES", str(budget_for_evals(solvers.B_SOLVER, b_evals))])


def ours_config(task: str, f_thres: int, variant: str, shape: dict[str, Any], extra: Sequence[str] = ()) -> Any:
    """Our config for ``task`` at the original's threshold ``f_thres`` (:func:`at_original_budget`), tolerance 0
    so it never stops before; ``extra`` overrides come last."""
    overrides = ["DEQ.F_EPS", "0.0", "DEQ.B_EPS", "0.0", "MODEL.DROPOUT", "0.0", "TRAIN.PRETRAIN_STEPS", "1",
                 *VARIANTS[task][variant], *extra]
    if task == "seg":
        overrides += ["TRAIN.IMAGE_SIZE", str(shape["crop"]), "TEST.IMAGE_SIZE", str(shape["crop"])]
    else:
        overrides += ["LM.TGT_LEN", str(shape["tgt_len"]), "LM.MEM_LEN", str(shape["tgt_len"])]
    return at_original_budget(CONFIGS[task], overrides, f_thres, SOLVERS[task])


def lm_kwargs(cfg: Any) -> dict[str, Any]:
    """The original DEQTransformerLM's keyword arguments for our config (the values ``from_config`` passes)."""
    t = cfg.MODEL.TRANSFORMER
    return dict(n_token=N_TOKEN, n_layer=cfg.MODEL.NUM_LAYERS, eval_n_layer=t.EVAL_N_LAYER, n_head=t.N_HEAD,
                d_model=t.D_MODEL, d_head=t.D_HEAD, d_inner=t.D_INNER, dropout=0.0, dropatt=t.DROPATT,
                tie_weights=t.TIE_WEIGHTS, d_embed=t.D_EMBED, div_val=t.DIV_VAL,
                tie_projs=[False] + [bool(t.TIE_PROJS)] * len(t.CUTOFFS), pre_lnorm=t.PRE_LNORM,
                wnorm=cfg.MODEL.WNORM, tgt_len=cfg.LM.TGT_LEN, mem_len=cfg.LM.MEM_LEN,
                pretrain_steps=cfg.TRAIN.PRETRAIN_STEPS, cutoffs=list(t.CUTOFFS))


def make_batch(task: str, cfg: Any, batch: int) -> tuple[torch.Tensor, ...]:
    """The same inputs in every process (a seeded generator): seg (image, labels), lm (data, target, mems)."""
    gen = torch.Generator().manual_seed(1)
    if task == "seg":
        width, height = cfg.TRAIN.IMAGE_SIZE
        labels = torch.randint(0, cfg.DATASET.NUM_CLASSES, (batch, height, width), generator=gen)
        labels[:, :, : width // 8] = 255  # ignored pixels, as Cityscapes has
        return torch.randn(batch, 3, height, width, generator=gen), labels
    qlen, d_model = cfg.LM.TGT_LEN, cfg.MODEL.TRANSFORMER.D_MODEL
    tokens = torch.randint(0, N_TOKEN, (qlen + 1, batch), generator=gen)
    mems = (torch.randn(cfg.LM.MEM_LEN, batch, d_model, generator=gen),
            torch.randn(cfg.LM.MEM_LEN, batch, 3 * d_model, generator=gen))
    return tokens[:-1], tokens[1:], mems


def build_ours(task: str, f_thres: int, variant: str, shape: dict[str, Any], batch: int,
               extra: Sequence[str] = ()) -> Built:
    """Our model for ``task`` (seed 0, config :func:`ours_config`) and its loss on the batch of :func:`make_batch`."""
    from deqlab.models import build_model
    from deqlab.segmentation.losses import build_seg_criterion
    from deqlab.utils.cpu_allocator import configure_cpu_allocator

    cfg = ours_config(task, f_thres, variant, shape, extra)
    configure_cpu_allocator(cfg.CPU_ALLOCATOR)
    torch.manual_seed(0)
    model = build_model(cfg, task=task, **({"n_token": N_TOKEN} if task == "lm" else {}))
    inputs, last = make_batch(task, cfg, batch), {}
    if task == "seg":
        criterion = build_seg_criterion(cfg)

        def loss(train_step: int) -> torch.Tensor:
            logits, last["info"] = model(inputs[0], train_step=train_step)
            return criterion(logits, inputs[1])
    else:
        def loss(train_step: int) -> torch.Tensor:
            nll, _, last["info"] = model(*inputs, train_step=train_step)
            return nll.mean()
    return Built(model, loss, lambda: (last["info"]["fwd"]["nfe"], last["info"]["bwd"]["nfe"]))


def build_original(task: str, root: str, f_thres: int, shape: dict[str, Any], batch: int) -> Built:
    """The original for ``task`` from its checkout at ``root`` (our config gives the shapes and the batch)."""
    cfg, counts = ours_config(task, f_thres, "ours", shape), {"fwd": 0, "bwd": 0}
    inputs = make_batch(task, cfg, batch)
    if task == "seg":
        model, step_loss = originals.mdeq_seg(root, CONFIGS[task], f_thres, counts)
    else:
        model, step_loss = originals.deq_transformer(root, lm_kwargs(cfg), f_thres, counts)

    def loss(train_step: int) -> torch.Tensor:
        counts.update(fwd=0, bwd=0)
        return step_loss(*inputs, train_step)
    return Built(model, loss, lambda: (counts["fwd"], counts["bwd"]))


def cell_grad_diff(task: str, ours: torch.nn.Module, theirs: torch.nn.Module) -> float:
    """||ours - theirs|| / ||theirs|| over the gradients of the DEQ cell's parameters (the same names on both)."""
    named = dict(theirs.named_parameters())
    pairs = [(p.grad, named[n].grad) for n, p in ours.named_parameters() if n.startswith(CELLS[task])]
    return float(sum((g - h).pow(2).sum() for g, h in pairs).sqrt() / sum(h.pow(2).sum() for _, h in pairs).sqrt())


def check(task: str, root: str, f_thres: int, shape: dict[str, Any], batch: int, weights: str) -> dict:
    """Save our seed-0 weights to ``weights``, load them into the original; per path (unrolled, DEQ at the
    budget) the two training losses and the relative difference of the cell's gradients after their backward."""
    # In the original's memory order (NCHW): NHWC's float32 round-off in these random-init cell gradients, where
    # the sums cancel heavily, reaches 3e-4 relative; in float64 the two layouts agree to 1e-14
    # (tests/test_fast_paths.py), and the timed "ours" runs the default layout.
    ours = build_ours(task, f_thres, "ours", shape, batch, extra=["MODEL.CHANNELS_LAST", "False"])
    torch.save(ours.model.state_dict(), weights)
    theirs = build_original(task, root, f_thres, shape, batch)
    originals.load_plain(theirs.model, torch.load(weights, weights_only=True))
    result = {}
    for path, train_step in (("unrolled", 0), ("deq", TRAIN_STEP)):
        losses = []
        for side in (ours, theirs):
            side.model.zero_grad()
            loss = side.loss(train_step)
            loss.backward()
            losses.append(float(loss.detach()))
        result[path] = {"ours": losses[0], "original": losses[1],
                        "loss": abs(losses[0] - losses[1]) / abs(losses[1]),
                        "grad": cell_grad_diff(task, ours.model, theirs.model)}
    return result


def converged_check(root: str, shape: dict[str, Any], batch: int) -> dict:
    """lm's DEQ path where both sides converge (``CONVERGED``): our seed-0 model in float64 with the cell's
    weight-norm gains scaled, its weights loaded into the original; both losses, the relative difference of the
    cell's gradients, and the relative residual each solve reached (ours: the largest over the samples; the
    original's: over the batch)."""
    thres, eps = CONVERGED["thres"], CONVERGED["eps"]
    reached: dict[str, float] = {}

    def recording(solver: Callable, key: str, residual: Callable[[Any], float]) -> Callable:
        def run(*args: Any, **kwargs: Any) -> Any:
            result = solver(*args, **kwargs)
            reached[key] = residual(result)
            return result
        return run

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the original makes its states and solver buffers in it
    try:
        ours = build_ours("lm", thres, "ours", shape, batch,
                          extra=["DEQ.F_SOLVER", "broyden", "DEQ.F_EPS", str(eps), "DEQ.B_EPS", str(eps)])
        with torch.no_grad():
            for name, param in ours.model.named_parameters():
                if name.startswith(CELLS["lm"]) and name.endswith("weight_g"):
                    param.mul_(CONVERGED["gain"])
        cfg = ours_config("lm", thres, "ours", shape)
        theirs, step_loss = originals.deq_transformer(root, lm_kwargs(cfg), thres, {"fwd": 0, "bwd": 0},
                                                      f_solver="broyden", eps=eps)
        originals.load_plain(theirs, ours.model.state_dict())
        deq = ours.model.deq
        ours_lowest = lambda result: float(result[1]["rel_lowest"].max())  # noqa: E731
        deq.f_solver = recording(deq.f_solver, "ours_fwd", ours_lowest)
        deq.b_solver = recording(deq.b_solver, "ours_bwd", ours_lowest)
        theirs.f_solver = recording(theirs.f_solver, "original_fwd", lambda result: result["lowest"])
        theirs.b_solver = recording(theirs.b_solver, "original_bwd", lambda result: result["lowest"])
        inputs = make_batch("lm", cfg, batch)
        losses = []
        for model, loss in ((ours.model, lambda: ours.loss(TRAIN_STEP)),
                            (theirs, lambda: step_loss(*inputs, TRAIN_STEP))):
            model.zero_grad()
            value = loss()
            value.backward()
            losses.append(float(value.detach()))
        return {"ours": losses[0], "original": losses[1], "loss": abs(losses[0] - losses[1]) / abs(losses[1]),
                "grad": cell_grad_diff("lm", ours.model, theirs), "residuals": reached}
    finally:
        torch.set_default_dtype(previous)


def time_train_steps(task: str, which: str, roots: dict[str, str], f_thres: int, shape: dict[str, Any],
                     batch: int, steps: int, weights: str) -> dict:
    """Median train-step time of ``which`` (``original`` or one of our variants) over ``steps`` after a warm-up,
    from the check's weights; its parameters, first loss and f evaluations per step."""
    from deqlab.checkpoint import load_weights

    if which == "original":
        built = build_original(task, roots[task], f_thres, shape, batch)
        originals.load_plain(built.model, torch.load(weights, weights_only=True))
    else:
        built = build_ours(task, f_thres, which, shape, batch)
        load_weights(built.model, weights)
    model = built.model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    losses, times = [], []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = built.loss(TRAIN_STEP)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    return {"train_s": statistics.median(times[1:]), "warmup_s": times[0] - statistics.median(times[1:]),
            "loss": losses[0], "evals": built.evals(),
            "params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def compare(args: Any, run_child: Callable[..., dict]) -> list[dict]:
    """For lm first the converged check (asserted); per t the check (asserted), then the original and our variants
    one after the other, each in its own process; print and return the rows."""
    converged = None
    if args.task == "lm":
        converged = run_child("converged", CONVERGED["thres"])
        residuals = ", ".join(f"{solve} {value:.1e}" for solve, value in converged["residuals"].items())
        print(f"converged DEQ path (cell gains x{CONVERGED['gain']}, float64, Broyden both ways to "
              f"{CONVERGED['eps']:.0e}): residuals {residuals}; relative differences: loss {converged['loss']:.1e}, "
              f"grads {converged['grad']:.1e}")
        if not converged["grad"] <= CONVERGED["tolerance"]:
            raise SystemExit(f"error: the converged DEQ-path cell gradients differ by {converged['grad']:.1e} "
                             f"(relative, > {CONVERGED['tolerance']:.0e}): the implicit gradients are not the same; "
                             f"nothing timed ({converged})")
    rows = []
    print(f"{'t':>3} {'variant':>10} {'params':>9} {'f evals':>9} {'train s':>8} {'/orig':>6} "
          f"{'loss':>10} {'Δloss rel':>9}")
    for f_thres in args.f_thres:
        found = run_child("check", f_thres)
        for (path, what), bound in TOLERANCE.items():
            if not found[path][what] <= bound:
                raise SystemExit(f"error: t={f_thres}: the {path} {what}s differ by {found[path][what]:.1e} "
                                 f"(relative, > {bound:.0e}): the two models do not compute the same thing; "
                                 f"nothing timed ({found})")
        print(f"{f_thres:>3} equal weights, relative differences: unrolled loss {found['unrolled']['loss']:.1e}, "
              f"grads {found['unrolled']['grad']:.1e}; DEQ loss {found['deq']['loss']:.1e}, "
              f"grads {found['deq']['grad']:.1e} (solves not converged: not asserted)")
        result = {which: run_child(which, f_thres) for which in ["original", *args.variants]}
        base = result["original"]
        for which, r in result.items():
            row = {"task": args.task, "f_thres": f_thres, "batch": args.batch, "variant": which, **r,
                   "train_ratio": r["train_s"] / base["train_s"],
                   "loss_rel_diff": abs(r["loss"] - base["loss"]) / abs(base["loss"]), "check": found,
                   "converged_check": converged}
            rows.append(row)
            print(f"{f_thres:>3} {which:>10} {r['params']:>9,} {'%d+%d' % tuple(r['evals']):>9} {r['train_s']:>8.3f} "
                  f"{row['train_ratio']:>6.2f} {r['loss']:>10.6g} {row['loss_rel_diff']:>9.1e}", flush=True)
    return rows


def child(args: Any) -> dict:
    """The ``--child WHICH T`` process of ``compare_original.py --task seg|lm``."""
    which, f_thres = args.child[0], int(args.child[1])
    shape = {"crop": args.crop, "tgt_len": args.tgt_len}
    if which == "converged":
        return converged_check(args.roots["lm"], shape, args.batch)
    if which == "check":
        return check(args.task, args.roots[args.task], f_thres, shape, args.batch, args.weights)
    return time_train_steps(args.task, which, args.roots, f_thres, shape, args.batch, args.steps, args.weights)
