"""Evaluate a language-model checkpoint: ``python tools/lm_eval.py --cfg FILE TEST.MODEL_FILE ckpt [KEY VALUE ...]``.

Perplexity of ``DATASET.TEST_SET`` (``valid`` or ``test``) with the memory ``LM.MEM_LEN``, forward budget
``DEQ.F_THRES`` (or ``TEST.F_THRES``), tolerance ``DEQ.F_EPS`` and solver ``DEQ.F_SOLVER`` of the command line;
``--results_file runs.csv`` appends one row (f_thres, f_eps, mem_len, ppl, loss, mean forward steps and f
evaluations, final residual), e.g. to sweep the test-time budget.

Example::

    python tools/lm_eval.py --cfg experiments/austen/deq_transformer_quickstart.yaml \\
        TEST.MODEL_FILE output/austen/deq_transformer_quickstart/model_best.pth DEQ.F_THRES 30
"""
from deqlab.engine.cli import run_tool
from deqlab.engine.launch import test_main

if __name__ == "__main__":
    run_tool(lambda: test_main("lm", __doc__))
