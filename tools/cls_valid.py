"""Evaluate a classifier checkpoint: ``python tools/cls_valid.py --cfg FILE TEST.MODEL_FILE ckpt.pth [KEY VALUE ...]``.

Prints top-1/top-5, loss, mean forward solver steps and f evaluations and final residual; ``--results_name
runs.csv`` appends one row per call (handy for sweeping ``DEQ.F_THRES`` at test time; ``tools/plot_sweep.py``
plots it).

Example::

    python tools/cls_valid.py --cfg experiments/fashion_mnist/cls_mdeq_quickstart.yaml \\
        TEST.MODEL_FILE output/fashion_mnist/cls_mdeq_quickstart/final_state.pth DEQ.F_THRES 16
"""
from deqlab.engine.cli import run_tool
from deqlab.engine.launch import test_main

if __name__ == "__main__":
    run_tool(lambda: test_main("cls", __doc__))
