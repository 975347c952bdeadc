"""Plot a run's training curves: ``python tools/plot_run.py TB_DIR [--out FILE]`` or ``python tools/plot_run.py
--cfg FILE [KEY VALUE ...]``.

One PNG of loss, the task metric (train and validation), forward solver steps and f evaluations, the final
forward residual and the learning rate against the training step, read from the run's tensorboard events
(``deqlab.utils.run_plot``). ``TB_DIR`` is the run's tensorboard folder, ``LOG_DIR/<dataset>/<config name>``;
``--cfg`` finds it from the config and its overrides (``LOG_DIR``, ``OUTPUT_DIR``). Runs keyed by seed (its
``seedN/`` subfolders) are drawn as the mean over the seeds with a min–max band. The figure goes to ``--out``,
by default ``curves.png`` beside the run's checkpoints (``--cfg``) or in ``TB_DIR``.

Example::

    python tools/plot_run.py --cfg experiments/fashion_mnist/cls_mdeq_quickstart.yaml
"""
import sys
from pathlib import Path

from deqlab.utils.tool_help import help_format


def main() -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, never a display
        from deqlab.compat import FlagParser, split_rest
        from deqlab.config import config_name, load_config
        from deqlab.engine.run_files import run_dir, run_files
        from deqlab.errors import DeqlabError
        from deqlab.utils.run_plot import plot_run, read_run
    except ImportError as err:
        print(f"error: {err}; pip install -e '.[plot]'", file=sys.stderr)
        sys.exit(2)
    parser = FlagParser(**help_format(__doc__))
    parser.add_argument("--cfg", default="", help="the run's experiment YAML, instead of TB_DIR")
    parser.add_argument("--out", type=Path, default=None, help="image file (default: curves.png, see above)")
    parser.epilog = "positional: TB_DIR (the run's tensorboard folder), or with --cfg: KEY VALUE ...\n" + parser.epilog
    try:
        # the words no flag took: TB_DIR, or the config's KEY VALUE pairs (flags may come anywhere among them)
        args, words = parser.parse_known_args()
        if args.cfg:
            cfg = load_config(args.cfg, split_rest(words, parser.prog))
            tb_dir, out, title = run_files(cfg, args.cfg).tb_dir, run_dir(cfg, args.cfg) / "curves.png", \
                f"{cfg.DATASET.DATASET} / {config_name(args.cfg)}"
        elif len(words) == 1 and not words[0].startswith("--"):
            tb_dir = Path(words[0])
            out, title = tb_dir / "curves.png", str(tb_dir)
        else:
            split_rest([word for word in words if word.startswith("--")], parser.prog)  # names an unknown flag
            parser.error("give the run's tensorboard folder, or --cfg FILE [KEY VALUE ...]")
        fig = plot_run(read_run(tb_dir), title)
        out = args.out or out
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
    except (DeqlabError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
