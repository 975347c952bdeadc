"""Print where a run writes a file, for shell scripts:
``python tools/run_files.py --cfg FILE [--keyed-by-seed] {config,log,checkpoint,best,final} [KEY VALUE ...]``.

The same names the trainer uses (``deqlab.engine.run_files``): ``--keyed-by-seed`` for a run given its seed
explicitly (``--seed N``), whose files carry the seed.

Example::

    python tools/run_files.py --cfg experiments/fashion_mnist/cls_mdeq_quickstart.yaml final OUTPUT_DIR runs
"""
import argparse

from deqlab.config import load_config
from deqlab.engine.cli import run_tool
from deqlab.utils.tool_help import help_format
from deqlab.engine.run_files import run_files

FILES = ("config", "log", "checkpoint", "best", "final")


def main() -> None:
    parser = argparse.ArgumentParser(**help_format(__doc__))
    parser.add_argument("file", choices=FILES)
    parser.add_argument("--cfg", required=True, help="the run's experiment YAML")
    parser.add_argument("--keyed-by-seed", action="store_true", help="the run was given its seed (--seed N)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="the run's overrides: KEY VALUE ...")
    args = parser.parse_args()
    print(getattr(run_files(load_config(args.cfg, args.opts), args.cfg, args.keyed_by_seed), args.file))


if __name__ == "__main__":
    run_tool(main)
