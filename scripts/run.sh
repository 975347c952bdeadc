#!/usr/bin/env bash
# MDEQ on CIFAR-10 with the torchdeq zoo's command line (deq-zoo/mdeq/mdeq_cifar/run.sh, run_small.sh), on deqlab's
# tools; without --cfg, the zoo's run.sh recipe (MDEQ-large, phantom gradient).
#   bash scripts/run.sh [--cfg FILE | --cfg ./configs/large.yaml] [flags] [KEY VALUE ...]   train
#   bash scripts/run.sh [--cfg FILE] --eval [--test_model CKPT] [KEY VALUE ...]             evaluate
# NPROC=4 bash scripts/run.sh ...   trains with torchrun on 4 processes (GPUs) of this node.
# The flags and what each sets: lib/compat/zoo_cifar.py (and lib/compat/torchdeq.py), listed below with --help.
# Example: bash scripts/run.sh --cfg ./configs/small.yaml --norm_type weight_norm --f_solver broyden --f_max_iter 22 --grad 5 --tau 0.5
set -euo pipefail
HELP_CONTINUES=1 . "$(dirname "$0")/_help.sh"  # --help: the header above, then the flags
cd "$(dirname "$0")/.."
exec python -m deqlab.compat.zoo_cifar "$@"
