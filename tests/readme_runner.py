"""Runs the README's commands quickly for tests/test_readme.py: the ``python`` on that test's PATH.

``python tools/X.py ARGS`` (typed in a README block, or run by a script the block calls) goes to a fork server
that imported torch and deqlab once: a forked child runs the tool as ``__main__`` with the caller's arguments,
stdin/stdout/stderr, working directory and environment, plus a tiny-budget ``KEY VALUE`` suffix for the task's
tools (a few-hundred-parameter model, one epoch). Starting Python and importing torch costs seconds per command
on a small machine, and the README has dozens of commands. Every other ``python`` command (``-c``, ``-m``,
other files) runs the real interpreter unchanged.

    python readme_runner.py --serve SOCKET   the server (tests/test_readme.py starts it)
    python readme_runner.py ARGS...          a command; $DEQLAB_README_SOCKET names the server
"""
from __future__ import annotations

import json
import os
import socket
import struct
import sys

SOCKET_ENV = "DEQLAB_README_SOCKET"
_MDEQ = ["MODEL.NUM_LAYERS", "2", "MODEL.NUM_GROUPS", "2", "MODEL.EXPANSION_FACTOR", "2",
         "MODEL.EXTRA.FULL_STAGE.NUM_BRANCHES", "2", "MODEL.EXTRA.FULL_STAGE.NUM_BLOCKS", "[1, 1]",
         "MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS", "[4, 8]", "MODEL.EXTRA.FULL_STAGE.BIG_KERNELS", "[0, 0]",
         "MODEL.SKIP_CHANNELS", "4", "TRAIN.PRETRAIN_STEPS", "1", "TRAIN.END_EPOCH", "1", "WORKERS", "0",
         "DEVICE", "cpu"]
# The budget appended to every command of a task's tools; nothing here changes where a run writes its files.
TINY = {
    "cls": _MDEQ + ["MODEL.EXTRA.FULL_STAGE.HEAD_CHANNELS", "[2, 4]", "MODEL.EXTRA.FULL_STAGE.FINAL_CHANSIZE", "16",
                    "TRAIN.PRECISE_BN_BATCHES", "1", "TRAIN.BATCH_SIZE_PER_GPU", "16", "TEST.BATCH_SIZE_PER_GPU", "16"],
    "seg": _MDEQ + ["MODEL.DOWNSAMPLE_TIMES", "2", "TRAIN.IMAGE_SIZE", "[64, 32]", "TRAIN.BASE_SIZE", "64",
                    "TRAIN.MULTI_SCALE", "False", "TRAIN.BATCH_SIZE_PER_GPU", "4", "TEST.BATCH_SIZE_PER_GPU", "2",
                    "TEST.IMAGE_SIZE", "[32, 32]", "TEST.BASE_SIZE", "64", "TRAIN.PRECISE_BN", "False"],
    "lm": ["MODEL.NUM_LAYERS", "2", "MODEL.TRANSFORMER.EVAL_N_LAYER", "2", "MODEL.TRANSFORMER.N_HEAD", "2",
           "MODEL.TRANSFORMER.D_HEAD", "8", "MODEL.TRANSFORMER.D_MODEL", "16", "MODEL.TRANSFORMER.D_EMBED", "16",
           "MODEL.TRANSFORMER.D_INNER", "32", "MODEL.TRANSFORMER.CUTOFFS", "[20, 40]", "LM.TGT_LEN", "8",
           "LM.MEM_LEN", "8", "LM.EVAL_TGT_LEN", "8", "LM.MAX_EVAL_STEPS", "2", "TRAIN.PRETRAIN_STEPS", "2",
           "TRAIN.MAX_STEP", "4", "TRAIN.EVAL_INTERVAL", "2", "TRAIN.WARMUP_STEPS", "0",
           "TRAIN.BATCH_SIZE_PER_GPU", "2", "TEST.BATCH_SIZE_PER_GPU", "2", "DEVICE", "cpu", "WORKERS", "0"],
}
# the modules behind scripts/run.sh, run_mdeq.sh and wt103_deq_transformer.sh (deqlab.compat)
LAUNCHERS = ("deqlab.compat.zoo_cifar", "deqlab.compat.zoo_imagenet", "deqlab.compat.wt103")
# generated scenes per split for the fashion_scenes dataset (instead of 6000/1000): its size, not a KEY VALUE
TINY_SCENES = (24, 8)


def task_of(argv: list[str]) -> str | None:
    """The task whose budget ``python tools/X.py ARGS`` (or ``python -m deqlab.compat.tools NAME ARGS``) gets:
    cls/seg/lm by the tool's name, sweep.py by --task."""
    name = argv[2] if argv[0] == "-m" else os.path.basename(argv[0])
    if name == "sweep.py":
        return argv[argv.index("--task") + 1] if "--task" in argv[:-1] else "cls"
    return next((task for task in TINY if name.startswith(task + "_")), None)


def _send_command(path: str, argv: list[str]) -> int:
    request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
        conn.connect(path)
        socket.send_fds(conn, [request], [0, 1, 2])
        reply = conn.recv(4)
    return struct.unpack("i", reply)[0] if len(reply) == 4 else 1


def _run_child(request: dict, fds: list[int], conn: socket.socket) -> None:
    """In the forked child: become the caller's process and run the tool as ``__main__``."""
    import runpy
    import signal
    import traceback

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the tool may wait for subprocesses of its own
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    argv = request["argv"]
    task = task_of(argv)
    sys.argv = argv + (TINY[task] if task else [])
    try:
        if argv[0] == "-m":  # python -m deqlab.compat.tools NAME ARGS
            sys.argv = sys.argv[1:]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if not isinstance(exit_.code, (int, type(None))):
            print(exit_.code, file=sys.stderr)
    except BaseException:  # what an uncaught exception does to a real process
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    conn.send(struct.pack("i", code))
    os._exit(code)


def serve(path: str) -> None:
    """Import the heavy modules, then fork one child per command. No torch op runs here (the OpenMP pool is
    created in each child, after the fork)."""
    import signal

    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot  # noqa: F401  (plot_sweep.py)
    import torch  # noqa: F401
    import deqlab.engine.launch  # noqa: F401
    import deqlab.tasks  # noqa: F401
    from deqlab.data import fashion_scenes

    fashion_scenes.N_TRAIN, fashion_scenes.N_VAL = TINY_SCENES
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(path + ".tmp")
    server.listen(16)
    os.rename(path + ".tmp", path)  # the socket appears once the server is ready
    while True:
        conn, _ = server.accept()
        message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        if os.fork() == 0:
            server.close()
            _run_child(json.loads(message), fds, conn)
        conn.close()
        for fd in fds:
            os.close(fd)


def main(argv: list[str]) -> None:
    serving = bool(os.environ.get(SOCKET_ENV))
    if argv[:1] == ["--serve"]:
        serve(argv[1])
    elif serving and argv and argv[0].endswith(".py") and os.path.basename(os.path.dirname(argv[0])) == "tools":
        sys.exit(_send_command(os.environ[SOCKET_ENV], argv))
    elif serving and argv[:2] == ["-m", "deqlab.compat.tools"] and len(argv) > 2:
        sys.exit(_send_command(os.environ[SOCKET_ENV], argv))
    elif serving and argv[:1] == ["-m"] and argv[1:2] and argv[1] in LAUNCHERS:
        # The original scripts' launchers (scripts/run.sh, ...) start the tools with sys.executable: make that this
        # runner (the `python` first on PATH), so the tools they start get the tiny budget too.
        import runpy
        import shutil

        sys.executable = shutil.which("python") or sys.executable
        sys.argv = argv[1:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        os.execv(sys.executable, [sys.executable, *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
