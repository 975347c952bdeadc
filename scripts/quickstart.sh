#!/usr/bin/env bash
# Install, then train and evaluate an MDEQ on the embedded default data, on CPU or GPU.
#   bash scripts/quickstart.sh [KEY VALUE ...]       classification on Fashion-MNIST (the default)
#   bash scripts/quickstart.sh seg [KEY VALUE ...]   segmentation on the generated Fashion-MNIST scenes
#   bash scripts/quickstart.sh lm [KEY VALUE ...]    DEQ-Transformer language model on Jane Austen's novels
# Each ends by writing curves.png (tools/plot_run.py) beside the checkpoints; seg also writes prediction PNGs and
# four image | truth | prediction | errors panels in predictions/ there; lm prints a paragraph the model writes.
# Example: bash scripts/quickstart.sh TRAIN.END_EPOCH 2   (the classifier, two epochs instead of four)
set -euo pipefail
. "$(dirname "$0")/_help.sh"  # --help: the header above
cd "$(dirname "$0")/.."
# DEQLAB_NO_INSTALL=1 skips the pip install (the tests run this script in an environment already installed)
pip_install_repo() { [ -n "${DEQLAB_NO_INSTALL:-}" ] || python -m pip install -q -e "$1"; }
TASK=cls
if [ "${1:-}" = seg ] || [ "${1:-}" = cls ] || [ "${1:-}" = lm ]; then TASK=$1; shift; fi
if [ "$TASK" = lm ]; then
  pip_install_repo '.[lm,plot]'
  CFG=${CFG:-experiments/austen/deq_transformer_quickstart.yaml}
  # the corpus folder the config names (data/austen by default)
  DATA=$(python tools/run_files.py --cfg "$CFG" data "$@")
  # Jane Austen's novels from Debian's r-cran-janeaustenr, in the WikiText layout (built once)
  [ -f "$DATA/train.txt" ] || python tools/make_austen_corpus.py --out "$DATA"
  python tools/lm_train.py --cfg "$CFG" "$@"
  FINAL=$(python tools/run_files.py --cfg "$CFG" best "$@")
  SWEEP="$(dirname "$FINAL")/quickstart_sweep.csv"  # beside the run's checkpoints
  rm -f "$SWEEP"
  # test-time forward budget: perplexity and residual, the model loaded once
  python tools/sweep.py --task lm --cfg "$CFG" --checkpoint "$FINAL" --results_name "$SWEEP" \
    --f_thres 2 4 8 16 32 "$@" DATASET.TEST_SET test DEQ.F_EPS 1e-6 | tail -5
  python -c "import csv, sys; from deqlab.data.lm import load_corpus, unigram_perplexity; c = load_corpus(sys.argv[1]); \
print(f'unigram perplexity of the test split: {unigram_perplexity(c.train, c.test, len(c.vocab)):.1f}'); \
[print(f\"F_THRES {r['f_thres']:>2}: test ppl {float(r['ppl']):7.2f}  residual {float(r['fwd_residual']):.2e}\") \
for r in csv.DictReader(open(sys.argv[2]))]" "$DATA" "$SWEEP"
  python tools/plot_sweep.py "$SWEEP"
  python tools/plot_run.py --cfg "$CFG" "$@"
  # a paragraph from a fixed prompt, warm-started equilibria against cold ones (tokens/s, f evaluations per token)
  python tools/lm_generate.py --prompt "It is a truth universally acknowledged" --tokens 120 --top_p 0.9 \
    --cfg "$CFG" "$@" TEST.MODEL_FILE "$FINAL"
  exit 0
fi
if [ "$TASK" = seg ]; then
  CFG=${CFG:-experiments/fashion_scenes/seg_mdeq_quickstart.yaml}; TRAIN=tools/seg_train.py; TEST=tools/seg_test.py
else
  CFG=${CFG:-experiments/fashion_mnist/cls_mdeq_quickstart.yaml}; TRAIN=tools/cls_train.py; TEST=tools/cls_valid.py
fi
pip_install_repo '.[plot]'
# Fashion-MNIST ships as a Debian package; elsewhere torchvision downloads it on first use.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null || true
fi
# Where the Debian package is missing, torchvision may download Fashion-MNIST (set to 0 to forbid).
export DEQLAB_ALLOW_DOWNLOAD=${DEQLAB_ALLOW_DOWNLOAD:-1}
python "$TRAIN" --cfg "$CFG" "$@"
FINAL=$(python tools/run_files.py --cfg "$CFG" final "$@")
RUN=$(dirname "$FINAL")
SAVE=()  # seg: class-id PNGs (the scenes' label format), colour/ PNGs and four panels beside the checkpoints
[ "$TASK" = seg ] && SAVE=(--save_pred "$RUN/predictions" --save_panels 4)
python "$TEST" --cfg "$CFG" "${SAVE[@]}" "$@" TEST.MODEL_FILE "$FINAL"
python tools/plot_run.py --cfg "$CFG" "$@"
