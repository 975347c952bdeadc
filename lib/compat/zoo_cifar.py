"""``scripts/run.sh``: the torchdeq zoo's CIFAR-10 MDEQ command line (``deq-zoo/mdeq/mdeq_cifar``'s ``main.py``,
``run.sh`` and ``run_small.sh``), on deqlab's classification tools.

    bash scripts/run.sh [--cfg FILE] [zoo or torchdeq flags] [KEY VALUE ...]         train
    bash scripts/run.sh [--cfg FILE] --eval [--test_model CKPT] [KEY VALUE ...]      evaluate

The zoo's config names (``--cfg ./configs/large.yaml``) stand for deqlab's recipe configs (``ZOO_CONFIGS``);
without ``--cfg`` it trains the zoo's ``run.sh`` recipe (MDEQ-large). Every flag of ``main.py`` and of torchdeq's
``add_deq_args`` maps to config keys (``FLAGS``, :mod:`deqlab.compat.torchdeq`) or is refused with the reason;
locuslab/mdeq's tool flags work too, and ``KEY VALUE`` pairs anywhere on the line win over the flags. ``--eval``
without ``--test_model`` evaluates the run's own final weights, as ``main.py`` does. ``NPROC=N`` trains under
torchrun on N processes.
"""
from __future__ import annotations

import argparse
import os
import sys

from deqlab.compat import Flag, FlagParser, add_flags, overrides, parse_anywhere, words
from deqlab.compat import mdeq, torchdeq, tools

DESCRIPTION = "the torchdeq zoo's CIFAR-10 MDEQ command line (run.sh, main.py) on deqlab's tools"
PROG = "run.sh"
# the zoo's --cfg files -> deqlab's configs of their recipes (the zoockpt branch's file names)
ZOO_CONFIGS = {"configs/large.yaml": "experiments/cifar/cls_mdeq_zoo_large.yaml",
               "configs/small.yaml": "experiments/cifar/cls_mdeq_zoo_small.yaml"}
DEFAULT_CONFIG = ZOO_CONFIGS["configs/large.yaml"]  # the zoo's run.sh

# main.py's flags (torchdeq's are in deqlab.compat.torchdeq)
FLAGS: dict[str, Flag] = {
    "--repeat": Flag(type=int, aliases=("-r",), only=1,
                     refuse="run the script once per repeat (with --seed N for different seeds)"),
    "--exp_id": Flag(type=str, convert=lambda name: ["OUTPUT_DIR", f"runs/{name}"],
                     help="OUTPUT_DIR runs/EXP_ID, as main.py"),
    "--log_dir": Flag(("LOG_DIR",)),
    "--data_dir": Flag(("DATA_DIR",)),
    "--test_model": Flag(("TEST.MODEL_FILE",)),
}


def parser() -> argparse.ArgumentParser:
    p = FlagParser(prog=PROG, allow_abbrev=False, description=DESCRIPTION,
                   epilog="config overrides: KEY VALUE ... anywhere on the line")
    p.add_argument("--cfg", default=DEFAULT_CONFIG, help=f"a config file or a zoo name ({', '.join(ZOO_CONFIGS)}); "
                                                        "default: %(default)s")
    p.add_argument("--eval", action="store_true", help="evaluate TEST.MODEL_FILE (default: the run's final weights)")
    p.add_argument("--seed", type=int, help="SEED N; the run's files carry the seed")
    p.add_argument("--results_name", "--results_file", dest="results_name", help="--eval: append a CSV row here")
    add_flags(p, FLAGS)
    add_flags(p, mdeq.FLAGS)
    add_flags(p, torchdeq.FLAGS)
    return p


def config_path(name: str) -> str:
    """The config ``--cfg`` names: a zoo config name stands for deqlab's config of its recipe."""
    if not os.path.isfile(name) and os.path.normpath(name) in ZOO_CONFIGS:
        return ZOO_CONFIGS[os.path.normpath(name)]
    return name


def commands(argv: list[str]) -> list[list[str]]:
    """The tool command line ``argv`` (the script's arguments) stands for."""
    from deqlab.config import load_config

    args = parse_anywhere(parser(), argv)
    cfg_path = config_path(args.cfg)
    keys = overrides(args, FLAGS) + overrides(args, mdeq.FLAGS) + overrides(args, torchdeq.FLAGS)
    cfg = load_config(cfg_path, keys + args.opts)
    keys += torchdeq.finish(args, cfg)
    seed = ["--seed", str(args.seed)] if args.seed is not None else []
    if args.eval:
        if not cfg.TEST.MODEL_FILE:  # main.py evaluates the run's final weights
            from deqlab.engine.run_files import run_files

            keyed = args.seed is not None or "SEED" in args.opts[::2]
            keys += words("TEST.MODEL_FILE")(run_files(cfg, cfg_path, keyed).final)
        results = ["--results_name", args.results_name] if args.results_name else []
        return [tools.command("cls_valid", ["--cfg", cfg_path, *seed, *results, *keys, *args.opts])]
    nproc = int(os.environ.get("NPROC", "1") or 1)
    return [tools.command("cls_train", ["--cfg", cfg_path, *seed, *keys, *args.opts], nproc,
                          ["--standalone"] if nproc > 1 else None)]


def main(argv: list[str] | None = None) -> int:
    return tools.launch(commands, argv)


if __name__ == "__main__":
    sys.exit(main())
