#!/usr/bin/env bash
# The GPU acceptance run (benchmarks/gpu_check.py): AMP float16/bfloat16 training steps of the cls, seg and lm models
# for DEQ.GRAD ift, phantom and unrolled against fp32, channels-last and the compiled cell against NCHW eager, a
# SyncBatchNorm seg step, NCCL process groups, DALI's GPU decoder against its CPU decoder, then the train/eval step
# timings (beside the originals when their checkouts are given). No data download; a few minutes on one GPU.
# Without CUDA it runs the CPU paths in about two minutes and reports the CUDA-only checks n/a.
# Writes benchmarks/results/gpu_check.json and prints a table; exit status 1 if a check fails. Its flags:
# python benchmarks/gpu_check.py --help. DEQLAB_NO_INSTALL=1 skips the pip install (e.g. on a machine offline).
# Example: bash scripts/gpu_check.sh --mdeq /path/to/mdeq
set -euo pipefail
. "$(dirname "$0")/_help.sh"  # --help: the header above
cd "$(dirname "$0")/.."
# DALI for its decoder checks; the test extras for the tiny JPEG tree the tests build (tests/conftest.py)
[ -n "${DEQLAB_NO_INSTALL:-}" ] || python -m pip install -q -e '.[test,dali]' \
  || echo "warning: pip install failed; checks whose packages are missing report n/a" >&2
python benchmarks/gpu_check.py "$@"
