#!/usr/bin/env bash
# Install, then train and evaluate an MDEQ on the embedded default data, on CPU or GPU.
#   bash scripts/quickstart.sh [KEY VALUE ...]       classification on Fashion-MNIST (the default)
#   bash scripts/quickstart.sh seg [KEY VALUE ...]   segmentation on the generated Fashion-MNIST scenes
set -euo pipefail
cd "$(dirname "$0")/.."
TASK=cls
if [ "${1:-}" = seg ] || [ "${1:-}" = cls ]; then TASK=$1; shift; fi
if [ "$TASK" = seg ]; then
  CFG=${CFG:-experiments/fashion_scenes/seg_mdeq_quickstart.yaml}; TRAIN=tools/seg_train.py; TEST=tools/seg_test.py
else
  CFG=${CFG:-experiments/fashion_mnist/cls_mdeq_quickstart.yaml}; TRAIN=tools/cls_train.py; TEST=tools/cls_valid.py
fi
python -m pip install -q -e .
# Fashion-MNIST ships as a Debian package; elsewhere torchvision downloads it on first use.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null || true
fi
# Where the Debian package is missing, torchvision may download Fashion-MNIST (set to 0 to forbid).
export DEQLAB_ALLOW_DOWNLOAD=${DEQLAB_ALLOW_DOWNLOAD:-1}
python "$TRAIN" --cfg "$CFG" "$@"
FINAL=$(python -c "import sys; from deqlab.config import load_config; from deqlab.engine import run_files; \
print(run_files(load_config(sys.argv[1], sys.argv[2:]), sys.argv[1]).final)" "$CFG" "$@")
python "$TEST" --cfg "$CFG" "$@" TEST.MODEL_FILE "$FINAL"
