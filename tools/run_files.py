"""Print where a run writes a file, for shell scripts:
``python tools/run_files.py --cfg FILE [--keyed-by-seed] {config,log,checkpoint,best,final,data} [KEY VALUE ...]``.

The same names the trainer uses (``deqlab.engine.run_files``): ``--keyed-by-seed`` for a run given its seed
explicitly (``--seed N``), whose files carry the seed. Takes the train tools' flags too (``--seed N``, the
original flags), anywhere on the line, so a script can pass it the line it passes them. ``data``: the folder
the run reads its dataset from (``deqlab.data.dataset_dir``).

Example::

    python tools/run_files.py --cfg experiments/fashion_mnist/cls_mdeq_quickstart.yaml final OUTPUT_DIR runs
"""
from deqlab.engine.cli import parse_config, run_tool, tool_parser
from deqlab.engine.run_files import run_files

FILES = ("config", "log", "checkpoint", "best", "final", "data")


def main() -> None:
    parser = tool_parser(__doc__)
    parser.add_argument("file", choices=FILES)
    parser.add_argument("--keyed-by-seed", action="store_true", help="the run was given its seed (--seed N)")
    args, cfg = parse_config(parser)
    if args.file == "data":
        from deqlab.data import dataset_dir

        print(dataset_dir(cfg))
        return
    print(getattr(run_files(cfg, args.cfg, args.keyed_by_seed or args.seed_explicit), args.file))


if __name__ == "__main__":
    run_tool(main)
