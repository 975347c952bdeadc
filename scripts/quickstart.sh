#!/usr/bin/env bash
# Install, then train and evaluate MDEQ on Fashion-MNIST (the embedded default data), on CPU or GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
CFG=${CFG:-experiments/fashion_mnist/cls_mdeq_quickstart.yaml}
python -m pip install -q -e .
# Fashion-MNIST ships as a Debian package; elsewhere torchvision downloads it on first use.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null || true
fi
# Where the Debian package is missing, torchvision may download Fashion-MNIST (set to 0 to forbid).
export DEQLAB_ALLOW_DOWNLOAD=${DEQLAB_ALLOW_DOWNLOAD:-1}
python tools/cls_train.py --cfg "$CFG" "$@"
OUT=$(python -c "import sys; from deqlab.config import load_config; from deqlab.engine import run_dir; \
print(run_dir(load_config(sys.argv[1], sys.argv[2:]), sys.argv[1]))" "$CFG" "$@")
python tools/cls_valid.py --cfg "$CFG" "$@" TEST.MODEL_FILE "$OUT/final_state.pth"
