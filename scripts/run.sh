#!/usr/bin/env bash
# Train or evaluate an MDEQ classifier (CIFAR-10 by default).
#   bash scripts/run.sh [--cfg FILE] [KEY VALUE ...]                      train
#   bash scripts/run.sh [--cfg FILE] --eval --test_model CKPT [KEY VALUE ...]  evaluate a checkpoint
# NPROC=4 bash scripts/run.sh ...   trains with torchrun on 4 processes (GPUs) of this node.
# Example: bash scripts/run.sh --cfg experiments/fashion_mnist/cls_mdeq_quickstart.yaml TRAIN.END_EPOCH 1
set -euo pipefail
. "$(dirname "$0")/_help.sh"  # --help: the header above
cd "$(dirname "$0")/.."
CFG=experiments/cifar/cls_mdeq_TINY.yaml
EVAL=0
MODEL=""
OPTS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --cfg) CFG=$2; shift 2 ;;
    --eval) EVAL=1; shift ;;
    --test_model) MODEL=$2; shift 2 ;;
    *) OPTS+=("$1"); shift ;;
  esac
done
if [ "$EVAL" = 1 ]; then
  [ -n "$MODEL" ] || { echo "error: --eval needs --test_model CKPT" >&2; exit 2; }
  exec python tools/cls_valid.py --cfg "$CFG" TEST.MODEL_FILE "$MODEL" ${OPTS[@]+"${OPTS[@]}"}
fi
if [ "${NPROC:-1}" -gt 1 ]; then
  exec torchrun --standalone --nproc_per_node "$NPROC" tools/cls_train.py --cfg "$CFG" ${OPTS[@]+"${OPTS[@]}"}
fi
exec python tools/cls_train.py --cfg "$CFG" ${OPTS[@]+"${OPTS[@]}"}
