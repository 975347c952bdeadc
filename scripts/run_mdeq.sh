#!/usr/bin/env bash
# MDEQ on ImageNet with the torchdeq zoo's command line (deq-zoo/mdeq/mdeq_imagenet/run_mdeq.sh), on deqlab's tools.
#   bash scripts/run_mdeq.sh --data PATH [zoo or torchdeq flags] [KEY VALUE ...]                 train
#   bash scripts/run_mdeq.sh --eval --data PATH --resume CKPT [--eval_f_max_iter K] [KEY VALUE ...]  evaluate
# The flags and what each sets: lib/compat/zoo_imagenet.py (and lib/compat/torchdeq.py), listed below with --help.
# Example: bash scripts/run_mdeq.sh --data data/imagenet --nproc_per_node 4 --save-path runs/zoo_small
set -euo pipefail
HELP_CONTINUES=1 . "$(dirname "$0")/_help.sh"  # --help: the header above, then the flags
cd "$(dirname "$0")/.."
exec python -m deqlab.compat.zoo_imagenet "$@"
