"""The command lines of locuslab/deq's ``wt103_deq_transformer.sh``, mapped to deqlab's ``lm_train`` / ``lm_eval``.

``bash scripts/wt103_deq_transformer.sh train|eval [flags] [KEY VALUE ...]`` runs ``python -m
deqlab.compat.wt103``: every flag of the original script and of the seeds' evaluation command becomes a config
key (``FLAGS``, and the few that depend on the mode or the process count in :func:`overrides`), then the train
tool (or, with ``eval`` / ``--eval``, the evaluation tool on the valid and then the test split) runs on one
process or, with ``--multi_gpu``, under torchrun on every visible GPU. An unknown flag is an error (exit 2),
never ignored; flags may come anywhere among the ``KEY VALUE`` pairs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deqlab.compat import Flag, FlagParser, add_flags, choose, parse_anywhere
from deqlab.compat import overrides as table_overrides
from deqlab.compat import tools
from deqlab.errors import ConfigError

CONFIG = "experiments/wikitext103/deq_transformer.yaml"
DATASETS = {"wt103": ["DATASET.DATASET", "wikitext103"], "wikitext103": ["DATASET.DATASET", "wikitext103"],
            "austen": ["DATASET.DATASET", "austen"]}


def _lower(key: str):
    return lambda name: [key, name.lower()]  # the original's solver and optimiser names are capitalised


FLAGS: dict[str, Flag] = {
    "--n_layer": Flag(("MODEL.NUM_LAYERS",), int), "--eval_n_layer": Flag(("MODEL.TRANSFORMER.EVAL_N_LAYER",), int),
    "--d_embed": Flag(("MODEL.TRANSFORMER.D_EMBED",), int), "--d_model": Flag(("MODEL.TRANSFORMER.D_MODEL",), int),
    "--n_head": Flag(("MODEL.TRANSFORMER.N_HEAD",), int), "--d_head": Flag(("MODEL.TRANSFORMER.D_HEAD",), int),
    "--d_inner": Flag(("MODEL.TRANSFORMER.D_INNER",), int), "--div_val": Flag(("MODEL.TRANSFORMER.DIV_VAL",), int),
    "--dropout": Flag(("MODEL.DROPOUT",), float), "--dropatt": Flag(("MODEL.TRANSFORMER.DROPATT",), float),
    "--lr": Flag(("TRAIN.LR",), float), "--warmup_step": Flag(("TRAIN.WARMUP_STEPS",), int),
    "--eval-interval": Flag(("TRAIN.EVAL_INTERVAL",), int), "--max_step": Flag(("TRAIN.MAX_STEP",), int),
    "--tgt_len": Flag(("LM.TGT_LEN",), int), "--mem_len": Flag(("LM.MEM_LEN",), int),
    "--eval_tgt_len": Flag(("LM.EVAL_TGT_LEN",), int),
    "--stop_mode": Flag(("DEQ.STOP_MODE",), str), "--f_thres": Flag(("DEQ.F_THRES",), int),
    "--b_thres": Flag(("DEQ.B_THRES",), int), "--f_eps": Flag(("DEQ.F_EPS",), float),
    "--rand_f_thres_delta": Flag(("DEQ.RAND_F_THRES_DELTA",), int),
    "--jac_loss_weight": Flag(("LOSS.JAC_LOSS_WEIGHT",), float),
    "--jac_loss_freq": Flag(("LOSS.JAC_LOSS_FREQ",), float),
    "--clip": Flag(("TRAIN.CLIP",), float), "--log-interval": Flag(("PRINT_FREQ",), int),
    "--adaptive": Flag(("MODEL.TRANSFORMER.ADAPTIVE",), None), "--wnorm": Flag(("MODEL.WNORM",), None),
    "--pre_lnorm": Flag(("MODEL.TRANSFORMER.PRE_LNORM",), None),
    "--spectral_radius_mode": Flag(("DEQ.SPECTRAL_RADIUS_MODE",), None), "--restart": Flag(("TRAIN.RESUME",), None),
    "--not_tied": Flag(type=None, convert=lambda _: ["MODEL.TRANSFORMER.TIE_WEIGHTS", "False"]),
    "--data": Flag(("DATASET.ROOT",), str),
    "--dataset": Flag(convert=choose(DATASETS, "--dataset")),
    "--optim": Flag(convert=_lower("TRAIN.OPTIMIZER")),
    "--f_solver": Flag(convert=_lower("DEQ.F_SOLVER")), "--b_solver": Flag(convert=_lower("DEQ.B_SOLVER")),
    "--pretrain_steps": Flag(("TRAIN.PRETRAIN_STEPS",), int, aliases=("--pretrain_step",)),
    # the original's 0 means "never increase"
    "--jac_incremental": Flag(type=int, convert=lambda n: ["LOSS.JAC_INCREMENTAL", str(n if n > 0 else 100000000)]),
    "--max_eval_steps": Flag(type=int, convert=lambda n: ["LM.MAX_EVAL_STEPS", str(max(n, 0))]),  # -1: all
    "--cuda": Flag(type=None, convert=lambda _: ["DEVICE", "cuda"]),
    "--restart_dir": Flag(type=str, convert=lambda d: ["TRAIN.RESUME_FILE", str(Path(d) / "checkpoint.pth")]),
    "--debug": Flag(type=None, convert=lambda _: [], help="accepted (the original's no-logging switch)"),
    "--gpu0_bsz": Flag(type=int, convert=lambda _: [], help="accepted and ignored: DDP splits the batch evenly"),
}


def parser() -> argparse.ArgumentParser:
    p = FlagParser(prog="wt103_deq_transformer.sh", allow_abbrev=False,
                   description="locuslab/deq's WikiText-103 script flags, run on deqlab's tools")
    p.add_argument("mode", choices=("train", "eval"))
    p.add_argument("--cfg", default=CONFIG, help="the config the flags override (default: %(default)s)")
    add_flags(p, FLAGS)
    p.add_argument("--batch_size", type=int, help="the global batch, split over the processes")
    p.add_argument("--seed", type=int), p.add_argument("--load"), p.add_argument("--name"), p.add_argument("--work_dir")
    p.add_argument("--results_file"), p.add_argument("--eval", action="store_true")
    p.add_argument("--multi_gpu", action="store_true", help="torchrun over every visible GPU")
    return p


def overrides(args: argparse.Namespace, nproc: int) -> list[str]:
    """The ``KEY VALUE`` list the flags stand for (see the module docstring)."""
    out = table_overrides(args, FLAGS)
    if args.batch_size is not None:  # the original's batch is global: split it over the processes
        if args.batch_size % nproc:
            raise ConfigError(f"--batch_size {args.batch_size} does not split evenly over {nproc} processes")
        out += ["TRAIN.BATCH_SIZE_PER_GPU", str(args.batch_size // nproc)]
    if args.work_dir is not None or args.name is not None:
        run = Path(args.work_dir or "LM-TFM") / (args.name or "")
        out += ["OUTPUT_DIR", str(run), "LOG_DIR", str(run / "log")]
    if args.load:
        out += ["TEST.MODEL_FILE" if evaluating(args) else "TRAIN.MODEL_FILE", args.load]
    return out


def evaluating(args: argparse.Namespace) -> bool:
    return args.mode == "eval" or args.eval


def commands(argv: list[str]) -> list[list[str]]:
    """The tool command lines for ``argv`` (the script's arguments)."""
    args = parse_anywhere(parser(), argv)
    nproc = 1
    if args.multi_gpu:
        import torch
        nproc = max(1, torch.cuda.device_count())
    keys = overrides(args, nproc) + args.opts
    seed = ["--seed", str(args.seed)] if args.seed is not None else []
    torchrun = ["--standalone"] if nproc > 1 else None
    if not evaluating(args):
        return [tools.command("lm_train", ["--cfg", args.cfg, *seed, *keys], nproc, torchrun)]
    if not args.load:
        raise ConfigError("wt103_deq_transformer.sh: evaluation needs --load CHECKPOINT")
    results = ["--results_file", args.results_file] if args.results_file else []
    return [tools.command("lm_eval", ["--cfg", args.cfg, *seed, *results, *keys, "DATASET.TEST_SET", split], nproc,
                          torchrun) for split in ("valid", "test")]


def main(argv: list[str] | None = None) -> int:
    return tools.launch(commands, argv)


if __name__ == "__main__":
    sys.exit(main())
