"""What every tool shares: ``--cfg FILE [KEY VALUE ...]`` parsing and one-line errors for bad input."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from deqlab.compat import FlagParser, add_flags, overrides, parse_anywhere
from deqlab.compat import mdeq as mdeq_flags
from deqlab.config import CfgNode, load_config
from deqlab.errors import DeqlabError
from deqlab.utils.tool_help import help_format


def tool_parser(doc: str) -> argparse.ArgumentParser:
    """The flags every tool takes (``doc``: the tool's module docstring, its ``--help``); ``KEY VALUE`` overrides
    may come before, between or after them."""
    fmt = help_format(doc)
    fmt["epilog"] = "config overrides: KEY VALUE ... (anywhere on the line; they win over the flags)\n" + fmt["epilog"]
    parser = FlagParser(allow_abbrev=False, **fmt)
    parser.add_argument("--cfg", required=True,
                        help="experiment YAML (experiments/<dataset>/*.yaml, as in the example above)")
    # python -m torch.distributed.launch passes --local-rank=N (--local_rank before torch 2.0); torchrun
    # sets LOCAL_RANK, which is what deqlab reads.
    parser.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=None,
                        help="same as SEED N; the run's files then carry the seed (final_state_seedN.pth.tar)")
    add_flags(parser, mdeq_flags.FLAGS)  # locuslab/mdeq's command lines keep working
    return parser


def parse_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> tuple[argparse.Namespace, CfgNode]:
    """Parse the command line and load the config it names, with its overrides.

    ``args.seed_explicit`` says whether the command line chose the seed (``--seed N`` or ``SEED N``): such a
    run's files are keyed by the seed, so several seeds can share an OUTPUT_DIR.
    """
    return config_from_args(parse_anywhere(parser, argv))


def config_from_args(args: argparse.Namespace) -> tuple[argparse.Namespace, CfgNode]:
    """:func:`parse_config` for a command line already parsed by :func:`deqlab.compat.parse_anywhere` (a tool
    that rearranges its arguments first)."""
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    flags = overrides(args, mdeq_flags.FLAGS)
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
