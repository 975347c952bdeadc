"""deqlab's train and test tools by name: ``python -m deqlab.compat.tools cls_train --cfg FILE ...``.

The same bodies as ``tools/<name>.py``, importable from any install (a launcher cannot count on a checkout's
``tools/`` folder); ``torchrun -m deqlab.compat.tools NAME ...`` runs one on every process.
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable

from deqlab.errors import ConfigError, DeqlabError

# the tools the original scripts' launchers run (deqlab.compat.zoo_*, deqlab.compat.wt103)
TOOLS = {"cls_train": ("train", "cls"), "cls_valid": ("test", "cls"), "lm_train": ("train", "lm"),
         "lm_eval": ("test", "lm")}


def command(name: str, argv: list[str], nproc: int = 1, torchrun: list[str] | None = None) -> list[str]:
    """The command line that runs tool ``name`` with ``argv``: one process, or torchrun with ``nproc`` per node
    (``torchrun``: extra torchrun options, e.g. multi-node)."""
    if name not in TOOLS:
        raise ConfigError(f"unknown tool {name}; expected one of {', '.join(TOOLS)}")
    if nproc <= 1 and not torchrun:
        return [sys.executable, "-m", __name__, name, *argv]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *(torchrun or []),
            "-m", __name__, name, *argv]


def execute(commands: list[list[str]]) -> int:
    """Run the commands in turn; the exit status of the first that fails, else 0. The last one replaces this
    process (its signals and exit status are the caller's)."""
    for cmd in commands[:-1]:
        code = subprocess.call(cmd)
        if code:
            return code
    sys.stdout.flush(), sys.stderr.flush()
    os.execv(commands[-1][0], commands[-1])
    return 0  # not reached


def launch(commands: Callable[[list[str]], list[list[str]]], argv: list[str] | None = None) -> int:
    """A launcher's body: run the tool commands ``commands(argv)`` builds from the script's arguments (default:
    this process's); bad arguments end as one line on stderr, exit 2."""
    try:
        cmds = commands(sys.argv[1:] if argv is None else argv)
    except DeqlabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return execute(cmds)


def main(argv: list[str]) -> None:
    from deqlab.engine.cli import run_tool
    from deqlab.engine.launch import test_main, train_main

    if not argv or argv[0] not in TOOLS:
        print(f"usage: python -m {__name__} {{{','.join(TOOLS)}}} --cfg FILE [flags] [KEY VALUE ...]",
              file=sys.stderr)
        sys.exit(2)
    kind, task = TOOLS[argv[0]]
    body = train_main if kind == "train" else test_main
    run_tool(lambda: body(task, f"{argv[0]} ({task})", argv[1:]))


if __name__ == "__main__":
    main(sys.argv[1:])
