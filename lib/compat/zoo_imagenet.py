"""``scripts/run_mdeq.sh``: the torchdeq zoo's ImageNet MDEQ command line (``deq-zoo/mdeq/mdeq_imagenet``'s
``run_mdeq.sh`` + ``train_mdeq_imagenet.py``), on deqlab's classification tools.

    bash scripts/run_mdeq.sh --data PATH [zoo flags] [KEY VALUE ...]                      train
    bash scripts/run_mdeq.sh --eval --data PATH --resume CKPT [--eval_f_max_iter K] ...   evaluate CKPT

Without ``--cfg``/``--model`` it trains the zoo's ``run_mdeq.sh`` recipe (``ZOO_CONFIG``: fixed-point iteration
with 26 steps, a 5-step phantom gradient, Nesterov SGD lr 0.05, wd 5e-5, no warm-up, 100 epochs, 64 images per
GPU, weight norm), so the zoo's own line, flags and all, gives the same run. Every flag of the zoo's script and
of torchdeq's ``add_deq_args`` maps to config keys (``FLAGS``, :mod:`deqlab.compat.torchdeq`) or is refused with
the reason; ``KEY VALUE`` pairs anywhere on the line win over the flags. One process runs directly; several run
under torchrun (``--nproc_per_node``, default: the visible GPUs; multi-node with ``--nnodes``, ``--node_rank``,
``--rdzv_endpoint``).
"""
from __future__ import annotations

import argparse
import os
import re
import sys

from deqlab.compat import Flag, FlagParser, add_flags, overrides, parse_anywhere, words
from deqlab.compat import torchdeq, tools
from deqlab.errors import ConfigError

DESCRIPTION = ("the torchdeq zoo's ImageNet MDEQ command line (run_mdeq.sh, train_mdeq_imagenet.py) "
               "on deqlab's tools")
PROG = "run_mdeq.sh"
ZOO_CONFIG = "experiments/imagenet/cls_mdeq_zoo_small.yaml"  # the zoo's run_mdeq.sh recipe (zoockpt's config)
MODEL_CONFIG = "experiments/imagenet/cls_mdeq_{}.yaml"  # --model SMALL|LARGE|XL: locuslab/mdeq's v1 recipes

# train_mdeq_imagenet.py's flags (torchdeq's are in deqlab.compat.torchdeq)
FLAGS: dict[str, Flag] = {
    "--data": Flag(("DATASET.ROOT",), help="holds train/ and val/ class folders, or train.rec/.idx and val.rec/.idx "
                                           "(then add --rec)"),
    "--start-epoch": Flag(("TRAIN.BEGIN_EPOCH",), int),
    "--print-freq": Flag(("PRINT_FREQ",), int),
    "--num-classes": Flag(("MODEL.NUM_CLASSES",), int),
    "--workers": Flag(("WORKERS",), int, aliases=("-j",)),
    "--batch-size": Flag(("TRAIN.BATCH_SIZE_PER_GPU",), int, help="training images per process (the zoo evaluates 50)"),
    "--lr": Flag(("TRAIN.LR",), float, aliases=("--learning-rate",)),
    "--nesterov": Flag(("TRAIN.NESTEROV",), None),
    "--epochs": Flag(("TRAIN.END_EPOCH",), int),
    "--wd": Flag(("TRAIN.WD",), float, aliases=("--weight-decay",)),
    "--momentum": Flag(("TRAIN.MOMENTUM",), float),
    "--imcrop": Flag(type=int, convert=lambda crop: ["MODEL.IMAGE_SIZE", f"[{crop}, {crop}]"]),
    "--imsize": Flag(type=int, convert=lambda size: []),  # checked against the crop by finish()
    "--warmup": Flag(type=int, only=0, refuse="deqlab's warm-up counts iterations: use TRAIN.WARMUP_STEPS N"),
    "--save-path": Flag(type=str, convert=lambda path: ["OUTPUT_DIR", path, "LOG_DIR", f"{path}/log"]),
    "--dali-cpu": Flag(type=None, convert=lambda _: ["DATASET.DALI_DEVICE", "cpu"]),
    "--local_rank": Flag(type=int, refuse="set by a launcher; run_mdeq.sh starts its own processes "
                                          "(--nproc_per_node N)"),
    # deqlab's own
    "--rec": Flag(type=None, convert=lambda _: ["DATASET.DATA_FORMAT", "rec"], help="--data holds recordIO files"),
}


def parser() -> argparse.ArgumentParser:
    p = FlagParser(prog=PROG, allow_abbrev=False, description=DESCRIPTION,
                   epilog="config overrides: KEY VALUE ... anywhere on the line")
    p.add_argument("--eval", action="store_true", help="evaluate --resume CKPT (TEST.MODEL_FILE) instead of training")
    p.add_argument("--resume", help="training: continue from this checkpoint (TRAIN.RESUME_FILE); --eval: the weights")
    p.add_argument("--cfg", help=f"any config file (default {ZOO_CONFIG}, the zoo's recipe)")
    p.add_argument("--model", help=f"SMALL, LARGE or XL: {MODEL_CONFIG.format('NAME')} (locuslab/mdeq's recipes)")
    p.add_argument("--loader", choices=("torchvision", "dali"), help="default: dali when nvidia.dali imports")
    p.add_argument("--results_name", "--results_file", dest="results_name", help="--eval: append a CSV row here")
    p.add_argument("--seed", type=int, help="SEED N; the run's files carry the seed")
    # str, checked by whole(): argparse's own int error would not say what is expected
    p.add_argument("--nproc_per_node", help="processes on this node (default: the visible GPUs, >= 1)")
    p.add_argument("--nnodes", default="1")
    p.add_argument("--node_rank", default="0")
    p.add_argument("--rdzv_endpoint", help="HOST:PORT, the same on every node (--nnodes > 1)")
    add_flags(p, FLAGS)
    add_flags(p, torchdeq.FLAGS)
    return p


def config_path(args: argparse.Namespace) -> str:
    if args.cfg:
        return args.cfg
    if args.model:
        return MODEL_CONFIG.format(args.model)
    return ZOO_CONFIG


def default_loader() -> str:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        print(f"{PROG}: NVIDIA DALI not installed (pip install -e '.[dali]'), using torchvision loaders",
              file=sys.stderr)
        return "torchvision"
    return "dali"


def finish(args: argparse.Namespace, cfg_path: str, keys: list[str]) -> list[str]:
    """The words of the flags that depend on the resolved config (torchdeq's, and ``--imsize``)."""
    if args.imsize is None and not torchdeq.needs_config(args):
        return []
    from deqlab.config import load_config
    from deqlab.data.imagenet import eval_resize

    cfg = load_config(cfg_path, keys)
    if args.imsize is not None and args.imsize != eval_resize(tuple(cfg.MODEL.IMAGE_SIZE)):
        raise ConfigError(f"--imsize {args.imsize}: deqlab resizes the shorter side to the crop / 0.875 "
                          f"({eval_resize(tuple(cfg.MODEL.IMAGE_SIZE))} for MODEL.IMAGE_SIZE {cfg.MODEL.IMAGE_SIZE})")
    return torchdeq.finish(args, cfg)


def commands(argv: list[str]) -> list[list[str]]:
    """The tool command line ``argv`` (the script's arguments) stands for."""
    args = parse_anywhere(parser(), argv)
    cfg = config_path(args)
    if not os.path.isfile(cfg):
        raise ConfigError(f"{PROG}: no config {cfg} (--model is SMALL, LARGE or XL; --cfg names any file)")
    if args.eval and not args.resume:
        raise ConfigError(f"{PROG}: --eval needs --resume CKPT (the weights to evaluate)")
    nproc, nnodes, node_rank = (whole(flag, value, low) for flag, value, low in (
        ("--nproc_per_node", args.nproc_per_node, 1), ("--nnodes", args.nnodes, 1), ("--node_rank", args.node_rank, 0)))
    if node_rank >= nnodes:
        raise ConfigError(f"{PROG}: --node_rank {node_rank} must be below --nnodes {nnodes} (ranks count from 0)")
    keys = overrides(args, FLAGS) + overrides(args, torchdeq.FLAGS)
    keys += finish(args, cfg, keys + args.opts)
    keys += ["DATASET.LOADER", args.loader or default_loader()]
    if args.resume:
        keys += words("TEST.MODEL_FILE" if args.eval else "TRAIN.RESUME_FILE")(args.resume)
    extra = (["--seed", str(args.seed)] if args.seed is not None else []) + (
        ["--results_name", args.results_name] if args.eval and args.results_name else [])
    tool_args = ["--cfg", cfg, *extra, *keys, *args.opts]
    torchrun = []
    if nnodes > 1:
        if not args.rdzv_endpoint:
            raise ConfigError(f"{PROG}: --nnodes {nnodes} needs --rdzv_endpoint HOST:PORT "
                              "(the same on every node)")
        torchrun = ["--nnodes", str(nnodes), "--node_rank", str(node_rank), "--rdzv_backend", "c10d",
                    "--rdzv_endpoint", args.rdzv_endpoint]
    nproc = nproc if nproc is not None else gpu_count()
    if nproc > 1 and not torchrun:
        torchrun = ["--standalone"]
    return [tools.command("cls_valid" if args.eval else "cls_train", tool_args, nproc, torchrun)]


def whole(flag: str, value: str | None, low: int) -> int | None:
    """``value`` as a whole number >= ``low`` (None stays None), or a one-line error naming ``flag``."""
    if value is None:
        return None
    if not re.fullmatch(r"[0-9]{1,9}", value) or int(value) < low:
        raise ConfigError(f"{PROG}: {flag} expects a whole number >= {low}, got '{value}'")
    return int(value)


def gpu_count() -> int:
    import torch

    return max(1, torch.cuda.device_count())


def main(argv: list[str] | None = None) -> int:
    return tools.launch(commands, argv)


if __name__ == "__main__":
    sys.exit(main())
