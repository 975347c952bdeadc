"""Plot a test-time solver sweep: ``python tools/plot_sweep.py sweep.csv [--out sweep.png]``.

Reads the rows ``tools/cls_valid.py --results_name sweep.csv`` appended (one per F_THRES) and draws, per
checkpoint, the performance and the final forward residual against the solver budget.
"""
import argparse
import sys
from pathlib import Path

from deqlab.utils.sweep import load_series


def label(checkpoint: str) -> str:
    """The checkpoint's run folder and file name (``cls_mdeq_TINY/final_state.pth``)."""
    return "/".join(Path(checkpoint).parts[-2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="image file (default: the CSV's name, .png)")
    args = parser.parse_args()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        series = load_series(args.csv)
    except (ImportError, OSError, ValueError) as err:
        hint = "; pip install -e '.[plot]'" if isinstance(err, ImportError) else ""
        print(f"error: {err}{hint}", file=sys.stderr)
        sys.exit(2)
    fig, (ax_perf, ax_res) = plt.subplots(1, 2, figsize=(10, 4))
    for name, points in series.items():
        steps, perf, residual = zip(*points)
        ax_perf.plot(steps, perf, marker="o", label=label(name))
        ax_res.semilogy(steps, residual, marker="o", label=label(name))
    ax_perf.set(xlabel="forward solver budget (DEQ.F_THRES)", ylabel="performance (top-1 % or loss)")
    ax_res.set(xlabel="forward solver budget (DEQ.F_THRES)", ylabel="final relative residual")
    for ax in (ax_perf, ax_res):
        ax.grid(True, alpha=0.3)
    ax_perf.legend()
    fig.tight_layout()
    out = args.out or args.csv.with_suffix(".png")
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
