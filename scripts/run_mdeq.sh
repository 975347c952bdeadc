#!/usr/bin/env bash
# MDEQ on ImageNet with the torchdeq zoo's flags, over torchrun (one process per GPU) and tools/cls_*.py.
#   bash scripts/run_mdeq.sh --data PATH [--model SMALL|LARGE|XL] [flags] [KEY VALUE ...]        train
#   bash scripts/run_mdeq.sh --eval --data PATH --resume CKPT [--eval_f_max_iter K] [KEY VALUE ...]  evaluate
# Flags (each sets config keys; KEY VALUE pairs, anywhere on the line, override them):
#   --data PATH            DATASET.ROOT: holds train/ and val/ class folders, or train.rec/.idx and val.rec/.idx
#                          (then add --rec, i.e. DATASET.DATA_FORMAT rec)
#   --model NAME | --cfg FILE   experiments/imagenet/cls_mdeq_NAME.yaml (default SMALL), or any config file
#   --eval                 evaluate --resume CKPT (TEST.MODEL_FILE) instead of training
#   --resume CKPT          training: continue from this checkpoint (TRAIN.RESUME_FILE); with --eval: the weights
#   --eval_f_max_iter K    test-time forward budget (TEST.F_THRES, torchdeq's units); training is unchanged
#   --batch-size B         per-process batch (TRAIN/TEST.BATCH_SIZE_PER_GPU)
#   --epochs N  --lr X  --wd X  --workers N  --save-path DIR (OUTPUT_DIR DIR, LOG_DIR DIR/log)
#   --dali-cpu             DALI decodes on the CPU (DATASET.DALI_DEVICE cpu); --loader torchvision|dali
#                          (default: dali when nvidia.dali imports, else torchvision)
#   --results_name CSV     evaluation: append a row (budget, top-1, top-5, steps, residual) to CSV
#   --nproc_per_node N     processes on this node (default: the visible GPUs, at least 1); one runs without torchrun
#   --nnodes N --node_rank I --rdzv_endpoint HOST:PORT   multi-node: run the same command on every node
# Example: bash scripts/run_mdeq.sh --data data/imagenet --model XL --epochs 100 --save-path runs/xl
set -euo pipefail
. "$(dirname "$0")/_help.sh"  # --help: the header above
cd "$(dirname "$0")/.."
die() { echo "error: run_mdeq.sh: $*" >&2; exit 2; }
need() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"; }
# count FLAG VALUE MIN: VALUE must be a whole number >= MIN (bash's own test would only warn and go on)
count() { [[ "$2" =~ ^[0-9]{1,9}$ ]] && [ "$((10#$2))" -ge "$3" ] || die "$1 expects a whole number >= $3, got '$2'"; }

CFG=""; MODEL=SMALL; EVAL=0; RESUME=""; LOADER=""; NPROC=""; NNODES=1; NODE_RANK=0; RDZV=""; RESULTS=""
KEYS=(); OVERRIDES=()
while [ $# -gt 0 ]; do
  case "$1" in
    --data) need "$@"; KEYS+=(DATASET.ROOT "$2"); shift 2 ;;
    --rec) KEYS+=(DATASET.DATA_FORMAT rec); shift ;;
    --model) need "$@"; MODEL=$2; shift 2 ;;
    --cfg) need "$@"; CFG=$2; shift 2 ;;
    --eval) EVAL=1; shift ;;
    --resume) need "$@"; RESUME=$2; shift 2 ;;
    --eval_f_max_iter) need "$@"; KEYS+=(TEST.F_THRES "$2"); shift 2 ;;
    --batch-size) need "$@"; KEYS+=(TRAIN.BATCH_SIZE_PER_GPU "$2" TEST.BATCH_SIZE_PER_GPU "$2"); shift 2 ;;
    --epochs) need "$@"; KEYS+=(TRAIN.END_EPOCH "$2"); shift 2 ;;
    --lr) need "$@"; KEYS+=(TRAIN.LR "$2"); shift 2 ;;
    --wd) need "$@"; KEYS+=(TRAIN.WD "$2"); shift 2 ;;
    --workers) need "$@"; KEYS+=(WORKERS "$2"); shift 2 ;;
    --save-path) need "$@"; KEYS+=(OUTPUT_DIR "$2" LOG_DIR "$2/log"); shift 2 ;;
    --dali-cpu) KEYS+=(DATASET.DALI_DEVICE cpu); shift ;;
    --loader) need "$@"; LOADER=$2; shift 2 ;;
    --results_name) need "$@"; RESULTS=$2; shift 2 ;;
    --nproc_per_node) need "$@"; count "$1" "$2" 1; NPROC=$2; shift 2 ;;
    --nnodes) need "$@"; count "$1" "$2" 1; NNODES=$2; shift 2 ;;
    --node_rank) need "$@"; count "$1" "$2" 0; NODE_RANK=$2; shift 2 ;;
    --rdzv_endpoint) need "$@"; RDZV=$2; shift 2 ;;
    --*) die "unknown flag $1 (see the flags at the top of scripts/run_mdeq.sh)" ;;
    *) [ $# -ge 2 ] || die "config overrides come in KEY VALUE pairs; $1 has no value"
       OVERRIDES+=("$1" "$2"); shift 2 ;;
  esac
done
[ "$NODE_RANK" -lt "$NNODES" ] || die "--node_rank $NODE_RANK must be below --nnodes $NNODES (ranks count from 0)"
CFG=${CFG:-experiments/imagenet/cls_mdeq_${MODEL}.yaml}
[ -f "$CFG" ] || die "no config $CFG (--model is SMALL, LARGE or XL; --cfg names any file)"
if [ -z "$LOADER" ]; then
  if python -c "import nvidia.dali" 2>/dev/null; then LOADER=dali; else
    LOADER=torchvision; echo "run_mdeq.sh: NVIDIA DALI not installed (pip install -e '.[dali]'), using torchvision loaders" >&2
  fi
fi
KEYS=(DATASET.LOADER "$LOADER" "${KEYS[@]}")
if [ -z "$NPROC" ]; then
  NPROC=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
LAUNCH=(python -m torch.distributed.run --nproc_per_node "$NPROC" --nnodes "$NNODES" --node_rank "$NODE_RANK")
if [ "$NNODES" -gt 1 ]; then
  [ -n "$RDZV" ] || die "--nnodes $NNODES needs --rdzv_endpoint HOST:PORT (the same on every node)"
  LAUNCH+=(--rdzv_backend c10d --rdzv_endpoint "$RDZV")
elif [ "$NPROC" -gt 1 ]; then
  LAUNCH+=(--standalone)
else
  # One process needs no process group; run it directly, so that a bad input ends as the tool's one-line error
  # (exit 2) rather than inside torchrun's multi-line failure report (exit 1).
  LAUNCH=(python)
fi
if [ "$EVAL" = 1 ]; then
  [ -n "$RESUME" ] || die "--eval needs --resume CKPT (the weights to evaluate)"
  EXTRA=(); [ -z "$RESULTS" ] || EXTRA=(--results_name "$RESULTS")
  exec "${LAUNCH[@]}" tools/cls_valid.py --cfg "$CFG" ${EXTRA[@]+"${EXTRA[@]}"} "${KEYS[@]}" TEST.MODEL_FILE "$RESUME" ${OVERRIDES[@]+"${OVERRIDES[@]}"}
fi
[ -z "$RESUME" ] || KEYS+=(TRAIN.RESUME_FILE "$RESUME")
exec "${LAUNCH[@]}" tools/cls_train.py --cfg "$CFG" "${KEYS[@]}" ${OVERRIDES[@]+"${OVERRIDES[@]}"}
