"""Training curves of a run as one figure: loss, the task metric, solver steps and f evaluations, the final
forward residual and the learning rate against the training step.

The series come from the run's tensorboard event files, read here with tensorboardX's own protobuf classes (no
``tensorboard`` install needed): ``train.log`` holds only the validation lines, the events hold every
``PRINT_FREQ``-th training step too (``train/*``) and each validation (``valid/*``). A run keyed by seed writes
its events under ``seedN/`` of the config's tensorboard folder; given that folder, every seed's series are read
and drawn as their mean with a shaded min–max band over the seeds.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

from deqlab.errors import DatasetError

Series = dict[str, dict[int, float]]  # tag -> {step: value}

# (panel title, tags drawn in it, log scale)
PANELS = (
    ("loss", ("train/loss", "valid/loss"), False),
    ("task metric", ("train/acc", "valid/top1", "train/pixel_acc", "valid/miou", "train/ppl", "valid/ppl"), False),
    ("forward solver", ("train/fwd_steps", "train/fwd_nfe", "valid/fwd_steps", "valid/fwd_nfe"), False),
    ("final forward residual", ("train/fwd_residual", "valid/fwd_residual"), True),
    ("learning rate", ("train/lr",), False),
)


def read_events(path: str | Path) -> Series:
    """Every scalar of the event files in folder ``path`` (not its subfolders), the last value per step."""
    from tensorboardX.proto.event_pb2 import Event
    series: Series = {}
    for file in sorted(Path(path).glob("events.out.tfevents.*")):
        data = file.read_bytes()
        pos = 0
        while pos + 12 <= len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            payload = data[pos + 12:pos + 12 + length]
            if len(payload) < length:  # a record still being written
                break
            pos += 16 + length
            event = Event.FromString(payload)
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    series.setdefault(value.tag, {})[int(event.step)] = float(value.simple_value)
    return series


def read_run(tb_dir: str | Path) -> list[Series]:
    """The series of a run's tensorboard folder: one per seed (``seedN/`` subfolders), else the folder's own."""
    tb_dir = Path(tb_dir)
    if not tb_dir.is_dir():
        raise DatasetError(f"{tb_dir}: no such tensorboard folder (LOG_DIR/<dataset>/<config name> of a run)")
    seeds = sorted(p for p in tb_dir.glob("seed*") if p.is_dir())
    runs = [s for s in (read_events(p) for p in (seeds or [tb_dir])) if s]
    if not runs:
        raise DatasetError(f"{tb_dir}: no tensorboard scalars in it{' or its seed folders' if seeds else ''}")
    return runs


def mean_and_band(runs: list[Series], tag: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Steps every seed logged ``tag`` at, and the mean, min and max over the seeds there; None if none did."""
    have = [r[tag] for r in runs if tag in r]
    if not have:
        return None
    steps = sorted(set.intersection(*(set(s) for s in have)))
    values = np.array([[s[step] for step in steps] for s in have], dtype=float).reshape(len(have), len(steps))
    return np.array(steps), values.mean(0), values.min(0), values.max(0)


def plot_run(runs: list[Series], title: str = "") -> Any:
    """A matplotlib figure, one panel per :data:`PANELS` entry that has data (mean ± min–max over seeds)."""
    import matplotlib.pyplot as plt
    panels = [(name, tags, log) for name, tags, log in PANELS if any(tag in r for r in runs for tag in tags)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, tags, log) in zip(axes[0], panels):
        for tag in tags:
            curve = mean_and_band(runs, tag)
            if curve is None:
                continue
            steps, mean, low, high = curve
            line, = ax.plot(steps, mean, marker="o" if tag.startswith("valid/") else None, markersize=3,
                            label=tag if len(runs) == 1 else f"{tag} (mean of {len(runs)} seeds)")
            if len(runs) > 1:
                ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
        ax.set_title(name)
        ax.set_xlabel("training step")
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
