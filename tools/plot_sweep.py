"""Plot a test-time solver sweep: ``python tools/plot_sweep.py sweep.csv [--out sweep.png]``.

Reads the rows ``tools/cls_valid.py``, ``tools/seg_test.py`` or ``tools/lm_eval.py`` appended with
``--results_name sweep.csv`` (one per call) and draws, per method (checkpoint run, seed taken out of the file
name), the performance (top-1, mIoU, perplexity or loss) and the final forward residual against the test-time
solver budget. A method evaluated with several seeds is drawn as the mean over seeds with a shaded min–max band.
"""
import argparse
import sys
from pathlib import Path

from deqlab.utils.sweep import group_sweep, method_labels, read_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="image file (default: the CSV's name, .png)")
    args = parser.parse_args()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        rows, perf_label = read_rows(args.csv)
    except (ImportError, OSError, ValueError) as err:
        hint = "; pip install -e '.[plot]'" if isinstance(err, ImportError) else ""
        print(f"error: {err}{hint}", file=sys.stderr)
        sys.exit(2)
    groups = group_sweep(rows)
    labels = method_labels(list(groups))
    fig, (ax_perf, ax_res) = plt.subplots(1, 2, figsize=(10, 4))
    for method, series in groups.items():
        seeds = max(s.seeds for s in series["perf"])
        label = labels[method] + (f" ({seeds} seeds)" if seeds > 1 else "")
        for ax, field in ((ax_perf, "perf"), (ax_res, "fwd_residual")):
            stats = series[field]
            budgets = [s.f_thres for s in stats]
            line, = ax.plot(budgets, [s.mean for s in stats], marker="o", label=label)
            if seeds > 1:
                ax.fill_between(budgets, [s.low for s in stats], [s.high for s in stats], color=line.get_color(),
                                alpha=0.2, linewidth=0)
    ax_res.set_yscale("log")
    ax_perf.set(xlabel="forward solver budget at test time (F_THRES)", ylabel=perf_label)
    ax_res.set(xlabel="forward solver budget at test time (F_THRES)", ylabel="final relative residual")
    for ax in (ax_perf, ax_res):
        ax.grid(True, alpha=0.3)
    ax_perf.legend()
    fig.tight_layout()
    out = args.out or args.csv.with_suffix(".png")
    try:
        fig.savefig(out, dpi=120)
    except OSError as err:
        print(f"error: cannot write {out}: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
