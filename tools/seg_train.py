"""Train an MDEQ segmenter: ``python tools/seg_train.py --cfg experiments/cityscapes/seg_mdeq_SMALL.yaml [KEY VALUE ...]``.

Several processes: ``torchrun --nproc_per_node N tools/seg_train.py --cfg ...`` (or the original
``python -m torch.distributed.launch --nproc_per_node N ...``); mIoU on the val list after every epoch.

Example::

    python tools/seg_train.py --cfg experiments/fashion_scenes/seg_mdeq_quickstart.yaml TRAIN.END_EPOCH 1
"""
from deqlab.engine.cli import run_tool
from deqlab.engine.launch import train_main

if __name__ == "__main__":
    run_tool(lambda: train_main("seg", __doc__))
