"""Reading the rows ``tools/cls_valid.py --results_name FILE.csv`` appends (test-time solver sweeps)."""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path


def load_series(path: Path) -> dict[str, list[tuple[int, float, float]]]:
    """``{checkpoint: [(f_thres, perf, fwd_residual), ...]}`` sorted by f_thres; ValueError on a bad file."""
    series: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    with path.open(newline="") as fh:
        for line, row in enumerate(csv.DictReader(fh), start=2):
            try:
                series[row["checkpoint"]].append((int(row["f_thres"]), float(row["perf"]),
                                                  float(row["fwd_residual"])))
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{path}:{line}: expected a cls_valid.py --results_name row "
                                 f"(checkpoint, f_thres, perf, fwd_residual)") from None
    if not series:
        raise ValueError(f"{path}: no rows")
    return {name: sorted(points) for name, points in series.items()}
