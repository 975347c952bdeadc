"""Where a run writes: one place that names every file, so runs with different seeds never share one.

Without an explicit seed a run of ``experiments/cifar/cls_mdeq_TINY.yaml`` writes ``config.yaml``,
``train.log``, ``checkpoint.pth``, ``model_best.pth`` and ``final_state.pth`` under
``OUTPUT_DIR/cifar10/cls_mdeq_TINY/`` and tensorboard events under ``LOG_DIR/cifar10/cls_mdeq_TINY/``.
With ``--seed N`` (or ``SEED N`` on the command line) every name carries ``_seedN`` and the final weights
are ``final_state_seedN.pth.tar`` (the name the "test like you train" study scripts of Ramzi et al. use),
tensorboard goes to ``.../seedN/``; so seeds share an OUTPUT_DIR and each resumes only its own checkpoint.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deqlab.config import config_name


@dataclass(frozen=True)
class RunFiles:
    out_dir: Path
    tb_dir: Path
    seed: int | None = None  # set when the run is keyed by its seed

    def _name(self, stem: str, ext: str) -> Path:
        return self.out_dir / (f"{stem}{ext}" if self.seed is None else f"{stem}_seed{self.seed}{ext}")

    @property
    def config(self) -> Path:
        return self._name("config", ".yaml")

    @property
    def log(self) -> Path:
        return self._name("train", ".log")

    @property
    def checkpoint(self) -> Path:
        return self._name("checkpoint", ".pth")

    @property
    def best(self) -> Path:
        return self._name("model_best", ".pth")

    @property
    def final(self) -> Path:
        return self._name("final_state", ".pth" if self.seed is None else ".pth.tar")


def run_dir(cfg: Any, cfg_path: str | os.PathLike) -> Path:
    """The folder a run of the config at ``cfg_path`` writes its checkpoints to."""
    return Path(cfg.OUTPUT_DIR) / cfg.DATASET.DATASET / config_name(cfg_path)


def run_files(cfg: Any, cfg_path: str | os.PathLike, keyed_by_seed: bool = False) -> RunFiles:
    """The files of a run; ``keyed_by_seed`` (the seed was given explicitly) puts ``cfg.SEED`` in every name."""
    tb_dir = Path(cfg.LOG_DIR) / cfg.DATASET.DATASET / config_name(cfg_path)
    if keyed_by_seed:
        return RunFiles(run_dir(cfg, cfg_path), tb_dir / f"seed{cfg.SEED}", int(cfg.SEED))
    return RunFiles(run_dir(cfg, cfg_path), tb_dir)
