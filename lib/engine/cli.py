"""What every tool shares: ``--cfg FILE [KEY VALUE ...]`` parsing and one-line errors for bad input."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from deqlab.config import CfgNode, load_config
from deqlab.errors import DeqlabError
from deqlab.utils.tool_help import help_format


# The original tools' flags, kept so their command lines keep working; each sets one config key.
LEGACY_FLAGS = {"--modelDir": "OUTPUT_DIR", "--logDir": "LOG_DIR", "--dataDir": "DATA_DIR",
                "--testModel": "TEST.MODEL_FILE", "--percent": "PERCENT"}


def tool_parser(doc: str) -> argparse.ArgumentParser:
    """The ``--cfg FILE [KEY VALUE ...]`` parser every train/test tool shares; ``doc``: the tool's module docstring."""
    parser = argparse.ArgumentParser(**help_format(doc))
    parser.add_argument("--cfg", required=True,
                        help="experiment YAML (experiments/<dataset>/*.yaml, as in the example above)")
    # python -m torch.distributed.launch passes --local-rank=N (--local_rank before torch 2.0); torchrun
    # sets LOCAL_RANK, which is what deqlab reads.
    parser.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=None,
                        help="same as SEED N; the run's files then carry the seed (final_state_seedN.pth.tar)")
    for flag, key in LEGACY_FLAGS.items():
        parser.add_argument(flag, dest=flag.lstrip("-"), default=None, help=f"same as {key} (locuslab/mdeq flag)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


def parse_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> tuple[argparse.Namespace, CfgNode]:
    """Parse the command line and load the config it names, with its overrides.

    ``args.seed_explicit`` says whether the command line chose the seed (``--seed N`` or ``SEED N``): such a
    run's files are keyed by the seed, so several seeds can share an OUTPUT_DIR.
    """
    return config_from_args(parser.parse_args(argv))


def config_from_args(args: argparse.Namespace) -> tuple[argparse.Namespace, CfgNode]:
    """:func:`parse_config` for a command line already parsed (a tool that rearranges its arguments first)."""
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    flags = [item for flag, key in LEGACY_FLAGS.items() if getattr(args, flag.lstrip("-")) is not None
             for item in (key, getattr(args, flag.lstrip("-")))]
    seed = ["SEED", str(args.seed)] if args.seed is not None else []
    args.seed_explicit = bool(seed) or "SEED" in args.opts[::2]
    return args, load_config(args.cfg, flags + list(args.opts) + seed)


def run_tool(main: Callable[[], object]) -> None:
    """Run ``main``; a DeqlabError (bad config, checkpoint or data) ends as one line on stderr, exit 2."""
    try:
        main()
    except DeqlabError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the last completed epoch's checkpoint is intact; rerun with TRAIN.RESUME True",
              file=sys.stderr)
        sys.exit(130)
