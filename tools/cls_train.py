"""Train an MDEQ classifier: ``python tools/cls_train.py --cfg experiments/cifar/cls_mdeq_TINY.yaml [KEY VALUE ...]``.

Several processes: ``torchrun --nproc_per_node N tools/cls_train.py --cfg ...``. ``--seed N`` keys the run's
files by the seed (``final_state_seedN.pth.tar``), so several seeds can share one OUTPUT_DIR.

Example::

    python tools/cls_train.py --cfg experiments/fashion_mnist/cls_mdeq_quickstart.yaml TRAIN.END_EPOCH 1
"""
from deqlab.engine.cli import run_tool
from deqlab.engine.launch import train_main

if __name__ == "__main__":
    run_tool(lambda: train_main("cls", __doc__))
