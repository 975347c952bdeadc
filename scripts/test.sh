#!/usr/bin/env bash
# Install what the tests need, then run them. CI (.ci/run) calls exactly this.
# Example: bash scripts/test.sh -k solvers   (arguments go to pytest; its own help: python -m pytest --help)
set -euo pipefail
. "$(dirname "$0")/_help.sh"  # --help: the header above
cd "$(dirname "$0")/.."
# DALI (the ImageNet loaders' tests run its CPU pipelines for real) and rdata (the Austen corpus reader)
python -m pip install -q -e '.[test,dali,lm]'
# The embedded Fashion-MNIST data some tests read (Debian package; skipped where apt is unavailable).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null \
    || echo "warning: could not install dataset-fashion-mnist; the test that reads it will be skipped" >&2
fi
# Two workers by default (DEQLAB_TEST_WORKERS=0 runs in one process); modules with a module-scoped fixture are
# kept on one worker each (xdist_group). One OpenMP thread per worker: two workers on two cores would otherwise
# oversubscribe them, and torch's batched linalg.solve is fine with it (unlike torch.set_num_threads here).
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" python -m pytest -n "${DEQLAB_TEST_WORKERS:-2}" --dist loadgroup "$@"
