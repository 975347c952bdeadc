"""The training loop of every task: one process or several (DDP), AMP, resumable, atomic checkpoints.

The task (``deqlab.tasks``) supplies the model, loaders, loss and metrics; this file does the rest once.
A run's files are named in ``deqlab.engine.run_files``: the resolved config, ``train.log``, a resume
checkpoint written after every epoch, the best and the final weights, tensorboard events. Only rank 0 writes,
and only from the run's second step on (its first update found finite) or its first save: a rerun that fails
before (a bad value, a resume file that does not fit, an immediate divergence) leaves the files an earlier run
left in its folder as they were. A step that goes non-finite stops the run (or is
skipped, ``TRAIN.NONFINITE``; ``deqlab.engine.divergence``), and no non-finite state is ever saved.
"""
from __future__ import annotations

import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from deqlab.checkpoint import describe_nonfinite, load_checkpoint, load_weights, nonfinite_tensors, save_checkpoint
from deqlab.config import dump_config
from deqlab.data import set_epoch
from deqlab.engine.divergence import DivergenceGuard, StepCheck, nonfinite_metrics
from deqlab.engine.evaluator import autocast_context, eval_f_thres, evaluate, grad_scaler, solver_summary
from deqlab.engine.logs import attach_log_file
from deqlab.engine.optim import build_objective, build_optimizer, build_scheduler, observe_validation
from deqlab.engine.precise_bn import log_gap, recompute_bn_stats
from deqlab.engine.run_files import run_files
from deqlab.errors import CheckpointError
from deqlab.tasks import Task, get_task
from deqlab.utils.dist import (DistInfo, barrier, broadcast_from_main, broadcast_module, gather_from_all,
                               init_distributed, to_device)

log = logging.getLogger("deqlab")


# What a resume checkpoint holds beyond a weights-only file (final_state.pth, model_best.pth).
RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "step")
# The engine's own per-step numbers; a task adds its own (accuracy, pixel accuracy) next to them.
TRAIN_STATS = ("loss", "jac_loss", "aux_loss", "fwd_steps", "fwd_nfe", "fwd_residual", "bwd_steps", "bwd_nfe",
               "bwd_vjps", "bwd_residual", "lr")


class Trainer:
    """Builds everything from the config and the task; ``fit()`` runs (or resumes) the training.

    ``task``: a registered task name (``cls``, ``seg``) or a :class:`deqlab.tasks.Task`. ``keyed_by_seed``:
    the seed was given explicitly, so every file of the run carries it (see ``deqlab.engine.run_files``).
    """

    def __init__(self, cfg: Any, cfg_path: str | os.PathLike, dist_info: DistInfo | None = None,
                 task: str | Task = "cls", keyed_by_seed: bool = False) -> None:
        self.cfg = cfg
        self.task = get_task(task, cfg) if isinstance(task, str) else task
        self.dist = dist_info or init_distributed(cfg.DEVICE, cfg.CPU_ALLOCATOR)
        self.device = self.dist.device
        self.files = run_files(cfg, cfg_path, keyed_by_seed)
        self.out_dir, self.tb_dir = self.files.out_dir, self.files.tb_dir
        torch.backends.cudnn.benchmark = cfg.CUDNN.BENCHMARK
        torch.backends.cudnn.deterministic = cfg.CUDNN.DETERMINISTIC
        torch.backends.cudnn.enabled = cfg.CUDNN.ENABLED

        torch.manual_seed(cfg.SEED)  # identical initial weights on every rank
        self.model = self.task.build_model().to(self.device)
        if cfg.MODEL.PRETRAINED:
            load_weights(self.model, cfg.MODEL.PRETRAINED, strict=False, exclude=self.task.pretrained_exclude,
                         fmt=cfg.MODEL.WEIGHTS_FORMAT)
        if cfg.TRAIN.MODEL_FILE:
            load_weights(self.model, cfg.TRAIN.MODEL_FILE, fmt=cfg.MODEL.WEIGHTS_FORMAT)
        self.net: nn.Module = self.model
        if self.dist.distributed:
            on_gpu = self.device.type == "cuda"
            if on_gpu and self.task.sync_batchnorm:  # SyncBatchNorm has no CPU (gloo) implementation
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=[self.device.index] if on_gpu
                                                           else None,
                                                           find_unused_parameters=self.task.find_unused_parameters)
        torch.manual_seed(cfg.SEED + self.dist.rank)  # dropout masks and augmentation differ per rank
        random.seed(cfg.SEED + self.dist.rank)

        self.train_loader = self.task.build_loader("train", distributed=self.dist.distributed)
        self.test_loader = self.task.build_loader("test", distributed=self.dist.distributed)
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer, len(self.train_loader))
        self.objective = build_objective(cfg)
        self.scaler = grad_scaler(cfg, self.device)
        self.epoch, self.step, self.best = cfg.TRAIN.BEGIN_EPOCH, 0, None
        self.batch_in_epoch = 0  # batches of the current epoch already trained (a mid-epoch checkpoint's position)
        self.pending_rng: dict[str, Any] | None = None
        self.last_validation = time.time()
        self.guard = DivergenceGuard(cfg, self.kept_files)
        self.saved_step: int | None = None  # the step of the last checkpoint this run wrote
        self.writer: Any = None  # tensorboard, once the run starts writing (start_writing)
        self.resume_from = Path(cfg.TRAIN.RESUME_FILE) if cfg.TRAIN.RESUME_FILE else self.files.checkpoint
        found = (cfg.TRAIN.RESUME_FILE or cfg.TRAIN.RESUME) and self.resume_file_on_every_rank()
        if cfg.TRAIN.RESUME_FILE and not found:
            raise CheckpointError(f"TRAIN.RESUME_FILE {self.resume_from} not found")
        if found:
            self.resume(self.resume_from)
        elif cfg.TRAIN.RESUME:
            log.info("TRAIN.RESUME: no checkpoint at %s, starting from scratch", self.resume_from)
        self.first_step = self.step  # where this process started: its files are written from the second step on
        self.held_scalars: list[tuple[str, float, int]] = []  # tensorboard points until then (add_scalars)

    def start_writing(self) -> None:
        """The run has trained (see :meth:`record`): from now on (rank 0) it writes its config, log and tensorboard
        events, and may replace the files an earlier run left in its folder."""
        if self.writer is not None or not self.dist.is_main:
            return
        dump_config(self.cfg, self.files.config)
        attach_log_file(self.files.log)
        from tensorboardX import SummaryWriter
        # tensorboardX names its file by the second and the host only: a resumed run started within the same
        # second would truncate the first run's events, so the suffix names the process and the starting step.
        self.writer = SummaryWriter(str(self.tb_dir), filename_suffix=f".{os.getpid()}.step{self.first_step}")

    def kept_files(self) -> str:
        """Where a run that stops on a non-finite step left its last finite state (the stop message)."""
        ckpt = self.files.checkpoint
        if self.saved_step is not None:
            return f"{ckpt} holds the last finite state (step {self.saved_step})"
        return f"nothing was saved ({ckpt} is as it was)" if ckpt.is_file() else "nothing was saved"

    def save(self, path: Path, state: dict[str, Any]) -> None:
        """Write ``state`` to ``path`` (rank 0) unless it holds a NaN or an infinity: then the run stops."""
        bad, total = nonfinite_tensors(state)
        if bad:
            raise self.guard.stop(self.step, f"{describe_nonfinite(bad, total)} in what {path.name} would hold")
        self.start_writing()
        save_checkpoint(path, state)

    # ---- checkpoints -------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The resume checkpoint's content. Collective: called on every rank (the task may gather its state)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step,
                "best_metric": self.best, "task": self.task.checkpoint_state(),
                "rng": gather_from_all(self.rng_state()),  # every rank's, indexed by rank
                "config": self.cfg.dump(), "version": 1}

    @property
    def resume_label(self) -> str:
        """How errors about the resume file name the setting that chose it."""
        return "TRAIN.RESUME_FILE" if self.cfg.TRAIN.RESUME_FILE else "TRAIN.RESUME: checkpoint"

    def resume_file_on_every_rank(self) -> bool:
        """Whether every rank sees the resume checkpoint (collective). Refused on every rank, in one line, when only
        some do (nodes that do not share a disk): those would start from scratch and the others resume."""
        found = gather_from_all(self.resume_from.is_file())
        if any(found) and not all(found):
            lacking = ", ".join(str(rank) for rank, ok in enumerate(found) if not ok)
            raise CheckpointError(f"{self.resume_label} {self.resume_from} is missing on rank(s) {lacking} of {len(found)}: "
                                  f"copy it to the same path on every node (or share OUTPUT_DIR) to resume")
        return all(found)

    def resume(self, path: Path) -> None:
        """Continue the training state at ``path``; refused in one line, before anything is written, unless it
        is a finite resume checkpoint of this model (not a weights-only file, not another task's or config's)."""
        label = self.resume_label
        state = load_checkpoint(path, map_location=self.device)
        missing = [k for k in RESUME_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            raise CheckpointError(f"{label} {path} is not a resume checkpoint (no {', '.join(missing)}); to start "
                                  f"from its weights, set TRAIN.MODEL_FILE {path} instead")
        bad, total = nonfinite_tensors(state)
        if bad:
            raise CheckpointError(f"{label} {path} holds a diverged state: {describe_nonfinite(bad, total)}")
        load_weights(self.model, path)  # one line naming what does not fit (another task's or config's file)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as err:
            raise CheckpointError(f"{label} {path}: its optimizer state does not fit this model ({err})") from None
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.best = state["epoch"], state["step"], state["best_metric"]
        self.batch_in_epoch = state.get("batch_in_epoch", 0)
        self.task.load_checkpoint_state(state.get("task", {}), self.device)
        # A mid-epoch checkpoint's random state is restored once the batches it had trained on are skipped
        # (loading them draws augmentation randomness), so the next batch is drawn exactly as it was.
        self.pending_rng = self.own_rng_state(state["rng"])
        if not self.batch_in_epoch:
            self.restore_rng()
        log.info("resumed from %s at epoch %d (step %d, best %s %s)", path, self.epoch, self.step,
                 self.task.best_metric, "-" if self.best is None else f"{self.best:.4g}")

    def rng_state(self) -> dict[str, Any]:
        """This rank's random state: torch's CPU generator, its GPU's (where CUDA is), python's ``random`` (its
        625 words: a tuple would not load weights-only). The engine draws nothing from numpy's global state."""
        rng = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return rng

    def own_rng_state(self, saved: list[dict[str, Any]] | dict[str, Any]) -> dict[str, Any] | None:
        """This rank's entry of a checkpoint's random states (a list by rank; an older checkpoint's one dict is
        rank 0's). Written by another number of ranks, only rank 0 gets its state: the data are sharded
        differently anyway, so the run cannot continue exactly, and resuming on fewer or more GPUs stays allowed
        rather than refused; the other ranks keep their fresh SEED + rank streams, as rank 0 says in one line."""
        states = saved if isinstance(saved, list) else [saved]
        if len(states) == self.dist.world_size:
            return states[self.dist.rank]
        if self.dist.is_main and self.dist.world_size > 1:
            log.warning("the resume checkpoint holds the random state of %d rank(s), this run has %d: ranks 1 and up "
                        "start from SEED + rank, so the run does not continue exactly", len(states),
                        self.dist.world_size)
        return states[0] if self.dist.is_main else None

    def restore_rng(self) -> None:
        """Set this rank's random state to the resume checkpoint's (once, see :meth:`resume`)."""
        rng, self.pending_rng = self.pending_rng, None
        if rng is None:
            return
        # the checkpoint was loaded onto this rank's device; the generators take their state from the CPU only
        torch.set_rng_state(rng["torch"].cpu())
        random.setstate((3, tuple(rng["python"]), None))
        if rng.get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"].cpu(), self.device)

    def save_weights(self, path: Path, metrics: dict[str, Any]) -> None:
        self.save(path, {"model": self.model.state_dict(), "epoch": self.epoch,
                         "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                         "config": self.cfg.dump()})

    # ---- training ----------------------------------------------------------------------------------------
    def train_step(self, x: Any, y: torch.Tensor) -> dict[str, float] | None:
        """One optimizer step on the batch ``(x, y)``; returns the numbers the progress bar and tensorboard show,
        or None when the step went non-finite and ``TRAIN.NONFINITE skip`` dropped its update."""
        cfg = self.cfg
        compute_jac = self.objective.draw_jac(self.step, self.epoch)
        f_thres = self.task.train_f_thres(compute_jac)
        undo = self.guard.snapshot(self.model, self.task)
        with autocast_context(cfg, self.device):
            output, info = self.task.forward(self.net, x, train_step=self.step, compute_jac_loss=compute_jac,
                                             f_thres=f_thres)
            terms = self.objective(self.task.loss, output, y, info, self.step, self.epoch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms.total).backward()
        # The step's one host sync. Under float16 AMP the scaler skips overflowing gradients itself.
        check = StepCheck.measure(self.model, terms.loss, terms.jac_loss, terms.aux_loss, info["fwd"],
                                  check_grads=not self.scaler.is_enabled())
        skipped = self.guard.skip(self.step + 1, check, undo, self.model, self.task)
        if skipped:
            log.warning("step %d: %s; its update is skipped (TRAIN.NONFINITE skip, %d in a row)", self.step + 1,
                        skipped, self.guard.skipped)
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.step += 1
            return None
        if cfg.TRAIN.CLIP > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.TRAIN.CLIP)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        fwd, bwd = solver_summary(info["fwd"]), solver_summary(info["bwd"])
        loss_value, jac_value, aux_value, _ = check.values
        return {"loss": loss_value, **self.task.train_stats(output.detach(), y), "jac_loss": jac_value,
                "aux_loss": aux_value, "fwd_steps": fwd.steps, "fwd_nfe": fwd.nfe, "fwd_residual": fwd.residual,
                # the backward solve's f evaluations, and the VJPs they cost (its first, at g = 0, costs none)
                "bwd_steps": bwd.steps, "bwd_nfe": bwd.nfe, "bwd_vjps": float(info["bwd"].get("vjp_evals", 0)),
                "bwd_residual": bwd.residual, "lr": self.optimizer.param_groups[0]["lr"]}

    def train_epoch(self) -> dict[str, float]:
        """Train until the end of the epoch (or ``TRAIN.MAX_STEP``), validating every ``TRAIN.EVAL_INTERVAL``
        steps if set. A run resumed mid-epoch skips the batches it had already trained on."""
        self.net.train()
        set_epoch(self.train_loader, self.epoch)
        skip = self.batch_in_epoch
        if not skip:  # resumed mid-epoch, the task's state (e.g. a language model's memory) came with the checkpoint
            self.task.start_pass(train=True)
        totals: dict[str, float] = {}
        interval, count = self.cfg.TRAIN.EVAL_INTERVAL, 0
        bar = tqdm(self.train_loader, desc=f"epoch {self.epoch + 1}/{self.cfg.TRAIN.END_EPOCH}",
                   disable=not self.dist.is_main, dynamic_ncols=True)
        try:
            batches = iter(bar)
            for _ in range(skip):  # with DataLoader workers the augmentation of the rest is not reproduced exactly
                next(batches)
            self.restore_rng()
            for i, (x, y) in enumerate(batches, skip):
                stats = self.train_step(to_device(x, self.device), to_device(y, self.device))
                self.batch_in_epoch = i + 1
                if stats is not None:  # None: a skipped non-finite step; it counts as a step, its numbers do not
                    count += 1
                    self.record(stats, totals, count, bar)
                if interval and self.step % interval == 0:
                    self.validate({k: v / max(count, 1) for k, v in totals.items()})
                    self.net.train()
                if self.max_step_reached():
                    break
            else:
                self.batch_in_epoch = 0
        finally:  # an error (a non-finite step) is printed on a line of its own
            bar.close()
        return {k: v / max(count, 1) for k, v in totals.items()}

    def record(self, stats: dict[str, float], totals: dict[str, float], count: int, bar: tqdm) -> None:
        """A trained step's numbers: summed into ``totals`` (``count`` steps of this epoch), shown, written to
        tensorboard. The second step of the run starts its files (:meth:`start_writing`): it has found the
        weights of the first update finite."""
        if self.step > self.first_step + 1:
            self.start_writing()
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + v
        task_stats = {k: f"{totals[k] / count:.4g}" for k in stats if k not in TRAIN_STATS}
        bar.set_postfix(loss=f"{totals['loss'] / count:.3f}", **task_stats, nfe=f"{stats['fwd_nfe']:.0f}",
                        lr=f"{stats['lr']:.2e}")
        if self.step % self.cfg.PRINT_FREQ == 0:
            self.add_scalars("train", stats)

    def add_scalars(self, group: str, values: dict[str, Any]) -> None:
        """The finite numbers of ``values`` to tensorboard (a perplexity overflowing to inf has no point to draw);
        rank 0 holds them until the run writes its files (:meth:`start_writing`), so the first step's are kept."""
        if not self.dist.is_main:
            return
        self.held_scalars += [(f"{group}/{k}", v, self.step) for k, v in values.items()
                              if isinstance(v, (int, float)) and math.isfinite(v)]
        if self.writer is not None:
            for scalar in self.held_scalars:
                self.writer.add_scalar(*scalar)
            self.held_scalars = []

    def max_step_reached(self) -> bool:
        return 0 < self.cfg.TRAIN.MAX_STEP <= self.step

    def precise_bn(self) -> None:
        """Before an evaluation: measure the BatchNorm statistics on training batches and, with
        ``TRAIN.PRECISE_BN``, make them the running ones (``deqlab.engine.precise_bn``)."""
        num = self.cfg.TRAIN.PRECISE_BN_BATCHES
        if num < 1:
            return
        start = time.time()

        def forward(model: nn.Module, batch: Any) -> None:
            with autocast_context(self.cfg, self.device):
                self.task.predict(model, to_device(batch[0], self.device), None)

        gap = recompute_bn_stats(self.model, self.train_loader, num, forward, update=self.cfg.TRAIN.PRECISE_BN)
        if self.dist.is_main:  # the measured statistics are merged over ranks: one line says it for all
            log_gap(gap, self.cfg.TRAIN.PRECISE_BN, time.time() - start)

    def validate(self, train: dict[str, float]) -> dict[str, float]:
        """Evaluate, log, and (rank 0) write the resume checkpoint and, if it improved, the best weights."""
        self.precise_bn()
        metrics = evaluate(self.task, self.net, self.test_loader, self.device, f_thres=eval_f_thres(self.cfg),
                           train_step=self.step)
        bad = nonfinite_metrics(metrics)  # summed over ranks: every rank stops
        if bad:
            raise self.guard.stop(self.step, f"the validation gave {bad}")
        observe_validation(self.scheduler, metrics["loss"])
        train_text = " ".join(f"{k} {v:.4g}" for k, v in train.items() if k not in TRAIN_STATS or k == "loss")
        log.info("epoch %d/%d step %d  train %s  |  test %s  |  solver steps %.1f f evals %.1f residual %.2e  |  %.0fs",
                 self.epoch + (self.batch_in_epoch > 0), self.cfg.TRAIN.END_EPOCH, self.step, train_text,
                 self.task.describe(metrics), metrics["fwd_steps"], metrics["fwd_nfe"], metrics["fwd_residual"],
                 time.time() - self.last_validation)
        score = metrics[self.task.best_metric]  # summed over ranks: every rank agrees
        improved = self.best is None or (score > self.best if self.task.higher_is_better else score < self.best)
        self.best = score if improved else self.best
        state = self.state()  # on every rank: the task may gather its state over ranks
        if self.dist.is_main:
            self.save(self.files.checkpoint, state)
            self.saved_step = self.step
            if improved:
                self.save_weights(self.files.best, metrics)
            self.add_scalars("valid", metrics)
        barrier()
        self.last_validation = time.time()
        return metrics

    def fit(self, stop_after: int | None = None) -> dict[str, float]:
        """Train until ``TRAIN.END_EPOCH`` or ``TRAIN.MAX_STEP`` (or ``stop_after`` more epochs); return the
        last validation metrics."""
        metrics: dict[str, float] = {}
        end = self.cfg.TRAIN.END_EPOCH if stop_after is None else min(self.cfg.TRAIN.END_EPOCH,
                                                                     self.epoch + stop_after)
        interval = self.cfg.TRAIN.EVAL_INTERVAL
        self.last_validation = time.time()
        while self.epoch < end and not self.max_step_reached():
            train = self.train_epoch()
            if self.batch_in_epoch == 0:
                self.epoch += 1
            if not interval or (self.max_step_reached() and self.step % interval):
                metrics = self.validate(train)  # per epoch, or the last steps after the last interval
        finished = self.epoch >= self.cfg.TRAIN.END_EPOCH or self.max_step_reached()
        if self.dist.is_main and finished:
            self.save_weights(self.files.final, metrics)
            log.info("done: %s (best %s %s)", self.files.final, self.task.best_metric,
                     "-" if self.best is None else f"{self.best:.4g}")
        if self.writer is not None:
            self.writer.close()
        return metrics

    def final_test(self) -> dict[str, float]:
        """The task's final test split (a language model's test set) on the best weights; {} when it has none."""
        split = self.task.final_test_split
        if not split or not broadcast_from_main(self.files.best.is_file()):
            return {}
        if self.dist.is_main:  # only rank 0 wrote the file: the other nodes may not see its disk
            load_weights(self.model, self.files.best)
        broadcast_module(self.model)
        frozen = self.cfg.is_frozen()
        self.cfg.defrost()
        self.cfg.DATASET.TEST_SET = split
        if frozen:
            self.cfg.freeze()
        loader = self.task.build_loader("test", distributed=self.dist.distributed)
        metrics = evaluate(self.task, self.net, loader, self.device, f_thres=eval_f_thres(self.cfg), desc=split,
                           train_step=self.step)
        log.info("%s split, best weights (%s): %s  |  solver steps %.1f f evals %.1f residual %.2e", split,
                 self.files.best, self.task.describe(metrics), metrics["fwd_steps"], metrics["fwd_nfe"],
                 metrics["fwd_residual"])
        return metrics
