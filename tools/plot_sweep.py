"""Plot test-time solver sweeps: ``python tools/plot_sweep.py sweep.csv [more.csv ...] [--out sweep.png] [--pdf]
[--group-by method|checkpoint] [--band std|minmax] [--table table.md]``.

Reads the rows ``tools/sweep.py``, ``tools/cls_valid.py``, ``tools/seg_test.py`` or ``tools/lm_eval.py``
appended with ``--results_name`` and draws the performance (top-1, mIoU, perplexity or loss) and the final
forward residual against the test-time solver budget. ``--group-by method`` (the default): one line per method
(a checkpoint run with the seed taken out of the file name), the mean over its seeds with a shaded ± std band
(``--band minmax``: min–max), as Ramzi et al. (2023, Fig. 5); ``--group-by checkpoint``: one line per
checkpoint. ``--pdf`` also writes the figure as PDF beside the PNG; ``--table FILE`` writes the numbers as a
Markdown table (``-`` prints it).

Example::

    python tools/plot_sweep.py sweep.csv --pdf --table sweep.md
"""
import argparse
import sys
from pathlib import Path

from deqlab.utils.sweep import BANDS, GROUP_BY, plot_sweep, read_sweeps, sweep_table
from deqlab.utils.tool_help import help_format


def image_formats() -> list[str]:
    """The file extensions matplotlib can write (png, pdf, svg, ...)."""
    from matplotlib.backend_bases import FigureCanvasBase

    return sorted(FigureCanvasBase.get_supported_filetypes())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(**help_format(__doc__))
    parser.add_argument("csv", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=None, help="image file (default: the first CSV's name, .png)")
    parser.add_argument("--pdf", action="store_true", help="also write the figure as PDF (the --out name, .pdf)")
    parser.add_argument("--group-by", "--group_by", dest="group_by", choices=GROUP_BY, default="method",
                        help="one line per method, mean ± spread over seeds (default), or per checkpoint")
    parser.add_argument("--band", choices=BANDS, default="std", help="spread over seeds: ± std (default) or min–max")
    parser.add_argument("--table", default="", metavar="FILE",
                        help="write a Markdown table of the numbers ('-': stdout)")
    args = parser.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, never a display
        formats = image_formats()
        if args.out is not None and args.out.suffix.lstrip(".").lower() not in formats:
            kind = f"{args.out.suffix} files" if args.out.suffix else "a file without an extension"
            raise ValueError(f"--out {args.out}: matplotlib cannot write {kind}; supported extensions: "
                             f"{', '.join('.' + f for f in formats)}")
        rows, perf_label = read_sweeps(args.csv)
    except (ImportError, OSError, ValueError) as err:
        hint = "; pip install -e '.[plot]'" if isinstance(err, ImportError) else ""
        print(f"error: {err}{hint}", file=sys.stderr)
        sys.exit(2)
    fig = plot_sweep(rows, perf_label, group_by=args.group_by, band=args.band)
    out = args.out or args.csv[0].with_suffix(".png")
    outputs = [out] + ([out.with_suffix(".pdf")] if args.pdf and out.suffix != ".pdf" else [])
    try:
        for path in outputs:
            fig.savefig(path, dpi=120)
        if args.table:
            table = sweep_table(rows, perf_label, group_by=args.group_by)
            if args.table == "-":
                print(table, end="")
            else:
                Path(args.table).write_text(table)
                outputs.append(Path(args.table))
    except OSError as err:
        print(f"error: cannot write: {err}", file=sys.stderr)
        sys.exit(2)
    print("wrote " + ", ".join(str(p) for p in outputs))


if __name__ == "__main__":
    main()
