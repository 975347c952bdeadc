"""Test-time solver sweeps: the rows ``--results_name FILE.csv`` appends (``tools/sweep.py``,
``tools/cls_valid.py``, ``tools/seg_test.py``, ``tools/lm_eval.py``), grouped by method and seed, drawn and
tabulated for ``tools/plot_sweep.py``.

A row needs ``checkpoint``, ``f_thres``, ``perf`` and ``fwd_residual``; ``seed`` (when the file name has
none), ``split``, ``f_solver`` and ``f_eps`` are used when present. A *method* is the checkpoint path with
the seed taken out of its file name (``.../ift_18/cifar10/cls_mdeq_TINY/final_state_seed3.pth.tar`` ->
``.../final_state.pth.tar``) plus the split and solver settings, so several seeds of one method form one
curve: mean over seeds with a ± std (or min–max) band per solver budget (the style of Ramzi et al. 2023,
Fig. 5). ``group_by="checkpoint"`` keeps every seed's checkpoint as its own curve instead.
"""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path, PurePath
from typing import Any, Sequence

SEED_IN_NAME = re.compile(r"_seed(\d+)")
REQUIRED = ("checkpoint", "f_thres", "perf", "fwd_residual")
SETTINGS = ("split", "f_solver", "f_eps")  # further columns that tell methods apart
PERF_COLUMNS = {"miou": "mIoU (%)", "top1": "top-1 accuracy (%)", "ppl": "perplexity", "loss": "loss"}  # what ``perf`` may be


# (checkpoint path parts without the seed, "key=value" settings)
Method = tuple[tuple[str, ...], tuple[str, ...]]


@dataclass(frozen=True)
class Row:
    method: Method
    seed: str
    f_thres: int
    perf: float
    fwd_residual: float


@dataclass(frozen=True)
class Stat:
    """One solver budget of one method: a value's mean over seeds, its spread and the number of seeds."""
    f_thres: int
    mean: float
    low: float
    high: float
    std: float  # sample standard deviation (0 with one seed)
    seeds: int


def read_rows(path: Path) -> tuple[list[Row], str]:
    """The CSV's rows and the y label of its ``perf`` column (``mIoU (%)``, ``top-1 accuracy (%)``, ``loss``,
    or ``performance`` when the rows do not say or disagree). ValueError names the file and line."""
    rows, labels = [], set()
    with path.open(newline="") as fh:
        for line, raw in enumerate(csv.DictReader(fh), start=2):
            try:
                checkpoint = PurePath(raw["checkpoint"])
                name_seed = SEED_IN_NAME.search(checkpoint.name)
                # The file name's seed names the trained run (the column is the evaluation's SEED)
                seed = name_seed.group(1) if name_seed else raw.get("seed", "")
                method = (checkpoint.with_name(SEED_IN_NAME.sub("", checkpoint.name)).parts,
                          tuple(f"{key}={raw[key]}" for key in SETTINGS if key in raw))
                perf = float(raw["perf"])
                rows.append(Row(method, seed, int(raw["f_thres"]), perf, float(raw["fwd_residual"])))
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{path}:{line}: expected a --results_name row with columns "
                                 f"{', '.join(REQUIRED)}") from None
            labels.add(next((label for column, label in PERF_COLUMNS.items()
                             if _number(raw.get(column)) == perf), "performance"))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows, labels.pop() if len(labels) == 1 else "performance"


def _number(text: str | None) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def method_labels(methods: list[Method]) -> dict[Method, str]:
    """Short names: the checkpoint path parts (aligned from the file name) and settings that differ between
    methods, or the run folder and file name when nothing differs."""
    depth = max(len(path) for path, _ in methods)
    padded = {m: ("",) * (depth - len(m[0])) + m[0] + m[1] for m in methods}
    varying = [i for i in range(len(next(iter(padded.values())))) if len({p[i] for p in padded.values()}) > 1]
    if not varying:
        return {m: "/".join(m[0][-2:]) for m in methods}
    return {m: "/".join(p[i] for i in varying if p[i]) or "/".join(m[0]) for m, p in padded.items()}


GROUP_BY = ("method", "checkpoint")
BANDS = ("std", "minmax")


def group_sweep(rows: list[Row], group_by: str = "method") -> dict[Method, dict[str, list[Stat]]]:
    """``{method: {"perf": [Stat per f_thres], "fwd_residual": [...]}}`` sorted by f_thres, statistics over
    the seeds. A (method, seed, f_thres) evaluated twice counts once: its last row. ``group_by="checkpoint"``:
    each seed of a method is its own group (its settings gain ``seed=N``), so every statistic has one seed."""
    if group_by not in GROUP_BY:
        raise ValueError(f"group_by must be one of {', '.join(GROUP_BY)}, got {group_by!r}")
    if group_by == "checkpoint":
        rows = [replace(r, method=(r.method[0], r.method[1] + (f"seed={r.seed}",))) for r in rows]
    latest: dict[tuple, Row] = {}
    for row in rows:
        latest[row.method, row.seed, row.f_thres] = row
    cells: dict[Method, dict[int, list[Row]]] = {}
    for row in latest.values():
        cells.setdefault(row.method, {}).setdefault(row.f_thres, []).append(row)
    return {method: {field: [_stat(t, [getattr(r, field) for r in by_budget[t]]) for t in sorted(by_budget)]
                     for field in ("perf", "fwd_residual")}
            for method, by_budget in cells.items()}


def _stat(f_thres: int, values: list[float]) -> Stat:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return Stat(f_thres, mean, min(values), max(values), math.sqrt(var), len(values))


def read_sweeps(paths: Sequence[Path]) -> tuple[list[Row], str]:
    """The rows of several CSVs and their common ``perf`` label (``performance`` when they disagree)."""
    rows, labels = [], set()
    for path in paths:
        more, label = read_rows(Path(path))
        rows += more
        labels.add(label)
    return rows, labels.pop() if len(labels) == 1 else "performance"


def plot_sweep(rows: list[Row], perf_label: str = "performance", group_by: str = "method",
               band: str = "std") -> Any:
    """A matplotlib Figure: performance (left) and final forward residual (right, log scale) against the
    test-time budget, one line per group (:func:`group_sweep`); a group with several seeds is drawn as the
    mean with a shaded ± std (``band="std"``) or min–max (``band="minmax"``) band. Needs matplotlib."""
    if band not in BANDS:
        raise ValueError(f"band must be one of {', '.join(BANDS)}, got {band!r}")
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    groups = group_sweep(rows, group_by)
    labels = method_labels(list(groups))
    fig = Figure(figsize=(10, 4))
    ax_perf, ax_res = fig.subplots(1, 2)
    for method, series in groups.items():
        seeds = max(s.seeds for s in series["perf"])
        label = labels[method] + (f" ({seeds} seeds)" if seeds > 1 else "")
        for ax, field in ((ax_perf, "perf"), (ax_res, "fwd_residual")):
            stats = series[field]
            budgets = [s.f_thres for s in stats]
            line, = ax.plot(budgets, [s.mean for s in stats], marker="o", label=label)
            if seeds > 1:
                low, high = _band(stats, band, log=field == "fwd_residual")
                ax.fill_between(budgets, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax_res.set_yscale("log")
    budget_label = "forward solver budget at test time (F_THRES)"
    ax_perf.set(xlabel=budget_label, ylabel=perf_label)
    ax_res.set(xlabel=budget_label, ylabel="final relative residual")
    budgets = sorted({s.f_thres for series in groups.values() for s in series["perf"]})
    for ax in (ax_perf, ax_res):
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])  # the budgets themselves, not powers of 2
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
    ax_perf.legend()
    fig.tight_layout()
    return fig


def _band(stats: list[Stat], band: str, log: bool) -> tuple[list[float], list[float]]:
    if band == "minmax":
        return [s.low for s in stats], [s.high for s in stats]
    low = [s.mean - s.std for s in stats]
    if log:  # a residual band must stay positive on the log axis
        low = [lo if lo > 0 else s.low for lo, s in zip(low, stats)]
    return low, [s.mean + s.std for s in stats]


def sweep_table(rows: list[Row], perf_label: str = "performance", group_by: str = "method") -> str:
    """A Markdown table of :func:`group_sweep`: per group and budget, the performance and the final residual
    as mean ± std over the seeds, and the number of seeds."""
    groups = group_sweep(rows, group_by)
    labels = method_labels(list(groups))
    lines = [f"| method | F_THRES | {perf_label} | final residual | seeds |", "|---|---:|---:|---:|---:|"]
    for method in sorted(groups, key=labels.get):
        for perf, res in zip(groups[method]["perf"], groups[method]["fwd_residual"]):
            lines.append(f"| {labels[method]} | {perf.f_thres} | {perf.mean:.2f} ± {perf.std:.2f} | "
                         f"{res.mean:.2e} ± {res.std:.1e} | {perf.seeds} |")
    return "\n".join(lines) + "\n"
