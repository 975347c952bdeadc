#!/usr/bin/env bash
# The "test like you train" stability study (Ramzi et al., 2023, Fig. 5): N seeds x {ift, unrolled}, each trained
# with a forward budget of DEQ.F_THRES 18, then evaluated over a range of test-time budgets, then plotted as the
# mean ± std over seeds per method (stability.png/.pdf) with its table (stability_table.md).
#
#   bash scripts/stability_study.sh [--seeds N] [--epochs E] [--budgets "1 2 4 8 16 32"] [--cfg FILE]
#                                   [--out DIR] [--train_f_thres 18] [KEY VALUE ...]
#
# Defaults: 3 seeds (0..N-1), the config's TRAIN.END_EPOCH, budgets 1 2 4 8 16 32, the embedded Fashion-MNIST
# quickstart (experiments/fashion_mnist/cls_mdeq_quickstart.yaml), output under output/stability/. KEY VALUE
# pairs go to every training and evaluation (e.g. PERCENT 0.02 for a smoke run; DEQ.GRAD, DEQ.F_THRES and the
# output folders are the study's own and cannot be overridden). Training and evaluation use
# DEQ.F_EPS 1e-7 and DEQ.RAND_F_THRES_DELTA 0, so the solver always spends its whole budget (the study's point).
# The "unrolled" method backpropagates through all the forward solver's steps (DEQ.GRAD unrolled). A run whose
# final checkpoint exists is not trained again (delete it to retrain); the sweeps are always redone.
# Example: bash scripts/stability_study.sh --seeds 3 --epochs 2 --budgets "1 2 4 8 18 36" PERCENT 0.25
set -euo pipefail
. "$(dirname "$0")/_help.sh"  # --help: the header above
cd "$(dirname "$0")/.."
SEEDS=3
EPOCHS=""
BUDGETS="1 2 4 8 16 32"
CFG=experiments/fashion_mnist/cls_mdeq_quickstart.yaml
OUT=output/stability
TRAIN_F_THRES=18
OPTS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seeds) SEEDS=$2; shift 2 ;;
    --epochs) EPOCHS=$2; shift 2 ;;
    --budgets) BUDGETS=$2; shift 2 ;;
    --cfg) CFG=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --train_f_thres) TRAIN_F_THRES=$2; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) OPTS+=("$1"); shift ;;
  esac
done
STUDY=(DEQ.F_EPS 0.0000001 DEQ.RAND_F_THRES_DELTA 0 TRAIN.ALL_UNROLLED False)
[ -n "$EPOCHS" ] && STUDY+=(TRAIN.END_EPOCH "$EPOCHS")
RESULTS=$OUT/stability_results.csv
mkdir -p "$OUT"
rm -f "$RESULTS"
START=$(date +%s)

final_checkpoint() {  # the final weights a run of "$CFG" with these overrides and --seed writes
  python tools/run_files.py --cfg "$CFG" --keyed-by-seed final "$@"
}

for ((seed = 0; seed < SEEDS; seed++)); do
  for method in ift unrolled; do
    RUN=(DEQ.GRAD "$method" DEQ.F_THRES "$TRAIN_F_THRES" OUTPUT_DIR "$OUT/${method}_$TRAIN_F_THRES"
         LOG_DIR "$OUT/log/${method}_$TRAIN_F_THRES")
    # the user's KEY VALUE pairs first: the method, its budget and its folders (RUN) always win
    CKPT=$(final_checkpoint "${STUDY[@]}" ${OPTS[@]+"${OPTS[@]}"} "${RUN[@]}" SEED "$seed")
    if [ -f "$CKPT" ]; then
      echo "== seed $seed, $method: $CKPT exists, not retrained"
    else
      echo "== seed $seed, $method: training (F_THRES $TRAIN_F_THRES)"
      t0=$(date +%s)
      python tools/cls_train.py --cfg "$CFG" --seed "$seed" "${STUDY[@]}" ${OPTS[@]+"${OPTS[@]}"} "${RUN[@]}"
      echo "== seed $seed, $method: trained in $(( $(date +%s) - t0 ))s"
    fi
    t0=$(date +%s)
    # shellcheck disable=SC2086  # the budgets are words
    python tools/sweep.py --cfg "$CFG" --seed "$seed" --checkpoint "$CKPT" --results_name "$RESULTS" \
      --f_thres $BUDGETS "${STUDY[@]}" ${OPTS[@]+"${OPTS[@]}"}
    echo "== seed $seed, $method: swept budgets $BUDGETS in $(( $(date +%s) - t0 ))s"
  done
done
python tools/plot_sweep.py "$RESULTS" --group-by method --out "$OUT/stability.png" --pdf \
  --table "$OUT/stability_table.md"
cat "$OUT/stability_table.md"
echo "== stability study: $SEEDS seeds x {ift, unrolled}, $(( $(date +%s) - START ))s in all; results in $OUT"
