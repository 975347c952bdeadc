"""The command lines of locuslab/deq's ``wt103_deq_transformer.sh``, mapped to ``tools/lm_train.py`` / ``lm_eval.py``.

``bash scripts/wt103_deq_transformer.sh train|eval [flags] [KEY VALUE ...]`` runs ``python -m
deqlab.engine.wt103_flags``: every flag of the original script and of the seeds' evaluation command becomes a
config key (``FLAG_KEYS``, and the handful of special cases in :func:`overrides`), then the train tool (or, with
``eval`` / ``--eval``, the evaluation tool on the valid and then the test split) runs on one process or, with
``--multi_gpu``, under torchrun on every visible GPU. An unknown flag is an error (exit 2), never ignored.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from deqlab.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
CONFIG = "experiments/wikitext103/deq_transformer.yaml"
DATASETS = {"wt103": "wikitext103", "wikitext103": "wikitext103", "austen": "austen"}

# flag -> (config key, type); store_true flags set the key to True
FLAG_KEYS = {
    "--n_layer": ("MODEL.NUM_LAYERS", int), "--eval_n_layer": ("MODEL.TRANSFORMER.EVAL_N_LAYER", int),
    "--d_embed": ("MODEL.TRANSFORMER.D_EMBED", int), "--d_model": ("MODEL.TRANSFORMER.D_MODEL", int),
    "--n_head": ("MODEL.TRANSFORMER.N_HEAD", int), "--d_head": ("MODEL.TRANSFORMER.D_HEAD", int),
    "--d_inner": ("MODEL.TRANSFORMER.D_INNER", int), "--div_val": ("MODEL.TRANSFORMER.DIV_VAL", int),
    "--dropout": ("MODEL.DROPOUT", float), "--dropatt": ("MODEL.TRANSFORMER.DROPATT", float),
    "--lr": ("TRAIN.LR", float), "--warmup_step": ("TRAIN.WARMUP_STEPS", int),
    "--eval-interval": ("TRAIN.EVAL_INTERVAL", int), "--max_step": ("TRAIN.MAX_STEP", int),
    "--tgt_len": ("LM.TGT_LEN", int), "--mem_len": ("LM.MEM_LEN", int), "--eval_tgt_len": ("LM.EVAL_TGT_LEN", int),
    "--stop_mode": ("DEQ.STOP_MODE", str), "--f_thres": ("DEQ.F_THRES", int), "--b_thres": ("DEQ.B_THRES", int),
    "--f_eps": ("DEQ.F_EPS", float), "--rand_f_thres_delta": ("DEQ.RAND_F_THRES_DELTA", int),
    "--jac_loss_weight": ("LOSS.JAC_LOSS_WEIGHT", float), "--jac_loss_freq": ("LOSS.JAC_LOSS_FREQ", float),
    "--clip": ("TRAIN.CLIP", float), "--log-interval": ("PRINT_FREQ", int),
}
SWITCHES = {"--adaptive": "MODEL.TRANSFORMER.ADAPTIVE", "--wnorm": "MODEL.WNORM",
            "--pre_lnorm": "MODEL.TRANSFORMER.PRE_LNORM", "--spectral_radius_mode": "DEQ.SPECTRAL_RADIUS_MODE",
            "--restart": "TRAIN.RESUME"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (via main), like every deqlab tool
        raise ConfigError(f"wt103_deq_transformer.sh: {message}")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="wt103_deq_transformer.sh", allow_abbrev=False,
                description="locuslab/deq's WikiText-103 script flags, run on deqlab's tools")
    p.add_argument("mode", choices=("train", "eval"))
    p.add_argument("--cfg", default=CONFIG, help="the config the flags override (default: %(default)s)")
    for flag, (_, kind) in FLAG_KEYS.items():
        p.add_argument(flag, type=kind, default=None)
    for flag in SWITCHES:
        p.add_argument(flag, action="store_true")
    p.add_argument("--data"), p.add_argument("--dataset"), p.add_argument("--optim")
    p.add_argument("--f_solver"), p.add_argument("--b_solver")
    p.add_argument("--pretrain_steps", "--pretrain_step", dest="pretrain_steps", type=int)
    p.add_argument("--jac_incremental", type=int), p.add_argument("--batch_size", type=int)
    p.add_argument("--max_eval_steps", type=int), p.add_argument("--seed", type=int)
    p.add_argument("--load"), p.add_argument("--name"), p.add_argument("--work_dir"), p.add_argument("--restart_dir")
    p.add_argument("--results_file"), p.add_argument("--eval", action="store_true")
    p.add_argument("--debug", action="store_true", help="accepted (the original's no-logging switch)")
    p.add_argument("--multi_gpu", action="store_true", help="torchrun over every visible GPU")
    p.add_argument("--cuda", action="store_true", help="DEVICE cuda")
    p.add_argument("--gpu0_bsz", type=int, help="accepted and ignored: DDP splits the batch evenly")
    p.add_argument("--not_tied", action="store_true")
    return p


def overrides(args: argparse.Namespace, nproc: int) -> list[str]:
    """The ``KEY VALUE`` list the flags stand for (see the module docstring)."""
    out: list[str] = []
    for flag, (key, _) in FLAG_KEYS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            out += [key, str(value)]
    for flag, key in SWITCHES.items():
        if getattr(args, flag.lstrip("-")):
            out += [key, "True"]
    if args.not_tied:
        out += ["MODEL.TRANSFORMER.TIE_WEIGHTS", "False"]
    if args.data is not None:
        out += ["DATASET.ROOT", args.data]
    if args.dataset is not None:
        if args.dataset not in DATASETS:
            raise ConfigError(f"--dataset {args.dataset}: expected one of {', '.join(DATASETS)}")
        out += ["DATASET.DATASET", DATASETS[args.dataset]]
    for flag, key in (("optim", "TRAIN.OPTIMIZER"), ("f_solver", "DEQ.F_SOLVER"), ("b_solver", "DEQ.B_SOLVER")):
        if getattr(args, flag) is not None:
            out += [key, getattr(args, flag).lower()]
    if args.pretrain_steps is not None:
        out += ["TRAIN.PRETRAIN_STEPS", str(args.pretrain_steps)]
    if args.jac_incremental is not None:  # the original's 0 means "never increase"
        out += ["LOSS.JAC_INCREMENTAL", str(args.jac_incremental if args.jac_incremental > 0 else 100000000)]
    if args.max_eval_steps is not None:  # -1: all
        out += ["LM.MAX_EVAL_STEPS", str(max(args.max_eval_steps, 0))]
    if args.batch_size is not None:  # the original's batch is global: split it over the processes
        if args.batch_size % nproc:
            raise ConfigError(f"--batch_size {args.batch_size} does not split evenly over {nproc} processes")
        out += ["TRAIN.BATCH_SIZE_PER_GPU", str(args.batch_size // nproc)]
    if args.cuda:
        out += ["DEVICE", "cuda"]
    if args.work_dir is not None or args.name is not None:
        run = Path(args.work_dir or "LM-TFM") / (args.name or "")
        out += ["OUTPUT_DIR", str(run), "LOG_DIR", str(run / "log")]
    if args.restart_dir:
        out += ["TRAIN.RESUME_FILE", str(Path(args.restart_dir) / "checkpoint.pth")]
    if args.load:
        out += ["TEST.MODEL_FILE" if evaluating(args) else "TRAIN.MODEL_FILE", args.load]
    return out


def evaluating(args: argparse.Namespace) -> bool:
    return args.mode == "eval" or args.eval


def commands(argv: list[str]) -> list[list[str]]:
    """The tool command lines for ``argv`` (the script's arguments)."""
    args, rest = parser().parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("--")]
    if unknown:
        raise ConfigError(f"wt103_deq_transformer.sh: unknown flag {unknown[0]} (see scripts/wt103_deq_transformer.sh "
                          f"--help)")
    if len(rest) % 2:
        raise ConfigError(f"wt103_deq_transformer.sh: config overrides come in KEY VALUE pairs, got {' '.join(rest)}")
    nproc = 1
    if args.multi_gpu:
        import torch
        nproc = max(1, torch.cuda.device_count())
    keys = overrides(args, nproc) + rest
    seed = ["--seed", str(args.seed)] if args.seed is not None else []
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
              if nproc > 1 else [sys.executable])
    if not evaluating(args):
        return [launch + [str(REPO / "tools/lm_train.py"), "--cfg", args.cfg, *seed, *keys]]
    if not args.load:
        raise ConfigError("wt103_deq_transformer.sh: evaluation needs --load CHECKPOINT")
    results = ["--results_file", args.results_file] if args.results_file else []
    return [launch + [str(REPO / "tools/lm_eval.py"), "--cfg", args.cfg, *seed, *results, *keys,
                      "DATASET.TEST_SET", split] for split in ("valid", "test")]


def main(argv: list[str] | None = None) -> int:
    try:
        cmds = commands(sys.argv[1:] if argv is None else argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for cmd in cmds:
        code = subprocess.call(cmd, cwd=os.getcwd())
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
