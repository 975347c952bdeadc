#!/usr/bin/env bash
# MDEQ on ImageNet with the torchdeq zoo's command line (deq-zoo/mdeq/mdeq_imagenet/run_mdeq.sh), on deqlab's tools.
#   bash scripts/run_mdeq.sh --data PATH [zoo or torchdeq flags] [KEY VALUE ...]                 train
#   bash scripts/run_mdeq.sh --eval --data PATH --resume CKPT [--eval_f_max_iter K] [KEY VALUE ...]  evaluate
# The flags and what each sets: lib/compat/zoo_imagenet.py (and lib/compat/torchdeq.py), or --help.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m deqlab.compat.zoo_imagenet "$@"
