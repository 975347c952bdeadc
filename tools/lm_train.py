"""Train a DEQ-Transformer language model: ``python tools/lm_train.py --cfg FILE [KEY VALUE ...]``.

Validates every ``TRAIN.EVAL_INTERVAL`` steps (perplexity on ``DATASET.TEST_SET``, normally ``valid``), keeps the
best weights, and ends with the test split on them. Under ``torchrun`` each rank takes its own streams.

Example::

    python tools/lm_train.py --cfg experiments/austen/deq_transformer_quickstart.yaml TRAIN.MAX_STEP 500
"""
from deqlab.engine.cli import run_tool
from deqlab.engine.launch import train_main

if __name__ == "__main__":
    run_tool(lambda: train_main("lm", __doc__))
