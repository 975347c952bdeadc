#!/usr/bin/env bash
# locuslab/deq's WikiText-103 DEQ-Transformer script, on deqlab's tools (tools/lm_train.py, tools/lm_eval.py).
#   bash scripts/wt103_deq_transformer.sh train --data data/wikitext-103/ [original flags] [KEY VALUE ...]
#   bash scripts/wt103_deq_transformer.sh train --data data/wikitext-103/ --load pretrained_wt103_deqtrans_v3.pkl \
#        --eval --mem_len 300 --f_thres 30 --f_eps 1e-7 --f_solver broyden --results_file results.csv
# Every flag of the original script maps to a config key (lib/compat/wt103.py lists them; --help shows
# them); --cfg picks the config they override (experiments/wikitext103/deq_transformer{,_reg,_preln_reg}.yaml),
# --multi_gpu runs torchrun over the visible GPUs. `eval` (or `train --eval`) evaluates --load on valid and test.
# Example: bash scripts/wt103_deq_transformer.sh train --data data/wikitext-103/ --multi_gpu
set -euo pipefail
HELP_CONTINUES=1 . "$(dirname "$0")/_help.sh"  # --help: the header above, then the flags
cd "$(dirname "$0")/.."
exec python -m deqlab.compat.wt103 "$@"
