"""The original projects' command lines, as tables of flag → config key, in one place.

Every flag of an original tool or script is a :class:`Flag`: the config keys its value sets (with the word's
type and, where the meaning differs, a conversion), or the one-line reason deqlab refuses it. The tables:

- :mod:`deqlab.compat.mdeq`: locuslab/mdeq's tool flags (``--modelDir``, ``--testModel``, ...), on every tool;
- :mod:`deqlab.compat.torchdeq`: torchdeq's ``add_deq_args`` (``--f_solver``, ``--f_max_iter``, ``--grad``, ...);
- :mod:`deqlab.compat.zoo_imagenet` / :mod:`deqlab.compat.zoo_cifar`: the torchdeq zoo's MDEQ scripts
  (``scripts/run_mdeq.sh``, ``scripts/run.sh``);
- :mod:`deqlab.compat.wt103`: locuslab/deq's ``wt103_deq_transformer.sh``.

Flags may come anywhere on a command line, before, between or after the ``KEY VALUE`` pairs (which always win
over the flags); an unknown ``--flag`` is an error naming it. :mod:`deqlab.compat.tools` runs the tools by name,
so the launchers work from any install, not only from a checkout's ``tools/`` folder.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any, Callable

from deqlab.errors import ConfigError

Convert = Callable[[Any], list[str]]


@dataclass(frozen=True)
class Flag:
    """One original flag. ``keys`` get the value (a switch sets them to True) unless ``convert`` maps the
    value to ``KEY VALUE`` words itself; ``refuse`` (the reason) makes the flag an error, or, with ``only``, every
    value but ``only`` (the original's default, which changes nothing here)."""
    keys: tuple[str, ...] = ()
    type: Callable[[str], Any] | None = str  # None: a switch without a value
    convert: Convert | None = None
    aliases: tuple[str, ...] = ()
    nargs: str | None = None
    refuse: str = ""
    only: Any = None
    help: str = ""


def words(*keys: str) -> Convert:
    """A conversion that sets every key in ``keys`` to the value."""
    return lambda value: [item for key in keys for item in (key, str(value))]


def choose(table: dict[str, list[str] | str], flag: str) -> Convert:
    """A conversion by name: ``table[value]`` is the ``KEY VALUE`` list, or (a string) why the value is refused."""
    def convert(value: str) -> list[str]:
        if value not in table:
            raise ConfigError(f"{flag} {value}: expected one of {', '.join(table)}")
        if isinstance(table[value], str):
            raise ConfigError(f"{flag} {value}: {table[value]}")
        return list(table[value])
    return convert


class FlagParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one-line :class:`ConfigError`\\ s (the tools print them, exit 2)."""

    def error(self, message: str):  # argparse would print the usage and exit
        raise ConfigError(f"{self.prog}: {message}")


def add_flags(parser: argparse.ArgumentParser, table: dict[str, Flag]) -> None:
    """Declare ``table``'s flags on ``parser`` (dest: the flag without dashes; every default None)."""
    for flag, spec in table.items():
        names = (flag, *spec.aliases)
        if spec.type is None:
            parser.add_argument(*names, dest=dest(flag), action="store_true", default=None, help=describe(spec))
        else:
            parser.add_argument(*names, dest=dest(flag), type=spec.type, nargs=spec.nargs, default=None,
                                help=describe(spec))


def describe(spec: Flag) -> str | None:
    """The ``--help`` line of a flag: its own, or what it sets, or why it is refused."""
    if spec.refuse:
        return f"refused{'' if spec.only is None else f' unless {spec.only}'}: {spec.refuse}"
    return spec.help or (f"sets {', '.join(spec.keys)}" if spec.keys else None)


def dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def overrides(args: argparse.Namespace, table: dict[str, Flag]) -> list[str]:
    """The ``KEY VALUE`` words the flags given in ``args`` stand for, in ``table``'s order."""
    out: list[str] = []
    for flag, spec in table.items():
        value = getattr(args, dest(flag), None)
        if value is None:
            continue
        if spec.refuse and (spec.only is None or value != spec.only):
            shown = "" if spec.type is None else f" {' '.join(map(str, value)) if isinstance(value, list) else value}"
            raise ConfigError(f"{flag}{shown}: {spec.refuse}")
        if spec.convert is not None:
            out += spec.convert(value)
        else:
            out += words(*spec.keys)(True if spec.type is None else value)
    return out


def split_rest(rest: list[str], prog: str) -> list[str]:
    """The ``KEY VALUE`` pairs among the words no flag took; an unknown ``--flag`` is an error naming it."""
    unknown = [word for word in rest if word.startswith("--")]
    if unknown:
        raise ConfigError(f"{prog}: unknown flag {unknown[0]} (see {prog} --help)")
    if len(rest) % 2:
        raise ConfigError(f"{prog}: config overrides come in KEY VALUE pairs; {rest[-1]!r} has no value")
    return list(rest)


def _lists_last(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` with each list flag (``--grad 5 ...``) and its values moved to the end, its values being the words
    after it that its type reads: argparse would give it every word up to the next flag, the ``KEY VALUE`` pairs
    after it too. The pairs keep their order."""
    lists = {opt: action.type or str for action in parser._actions if action.nargs == "+"
             for opt in action.option_strings}
    head: list[str] = []
    tail: list[str] = []
    words_ = iter(argv)
    word = next(words_, None)
    while word is not None:
        if word not in lists:
            head.append(word)
            word = next(words_, None)
            continue
        tail.append(word)
        kind, word = lists[word], next(words_, None)
        while word is not None and not word.startswith("--") and _reads(kind, word):
            tail.append(word)
            word = next(words_, None)
    return head + tail


def _reads(kind: Callable[[str], Any], word: str) -> bool:
    try:
        kind(word)
    except (TypeError, ValueError):
        return False
    return True


def parse_anywhere(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv`` with flags anywhere among the ``KEY VALUE`` pairs, which land in ``args.opts``."""
    args, rest = parser.parse_known_args(_lists_last(parser, sys.argv[1:] if argv is None else list(argv)))
    args.opts = split_rest(rest, parser.prog)
    return args
