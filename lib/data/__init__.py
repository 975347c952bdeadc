"""Datasets and loaders keyed by ``cfg.DATASET.DATASET``.

``build_dataset(cfg, split)`` returns a torch Dataset; ``build_loader(cfg, split)`` wraps it in a DataLoader
(the train split always through a seeded ``DistributedSampler``, whose ``set_epoch`` the caller calls every
epoch; the test split sharded over ranks without padding).

Where the files live: ``dataset_dir(cfg)`` is ``<DATA_DIR>/<DATASET.ROOT>/<name>`` (``DATA_DIR`` only
prefixes a relative ROOT), except that a ROOT already ending in the dataset's folder name is used as is, so
the locuslab/mdeq style ``ROOT: data/cifar10/`` and ``ROOT: data/`` both give ``data/cifar10``.
Missing files raise :class:`deqlab.errors.DatasetError`; nothing is downloaded unless
``DEQLAB_ALLOW_DOWNLOAD=1``.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from deqlab.data.fashion_scenes import build_fashion_scenes
from deqlab.data.segmentation import build_segmentation
from deqlab.data.vision import build_cifar10, build_fashion_mnist, build_imagenet, image_hw
from deqlab.errors import DatasetError

__all__ = ["DATASETS", "build_dataset", "build_loader", "dataset_dir", "subsample", "image_hw"]

# name -> (builder(cfg, folder, split, augment), folder name under DATASET.ROOT)
DATASETS: dict[str, tuple[Callable, str]] = {
    "fashion_mnist": (build_fashion_mnist, "fashion_mnist"),
    "cifar10": (build_cifar10, "cifar10"),
    "imagenet": (build_imagenet, "imagenet"),
    # segmentation (deqlab.data.segmentation): items (image (3, H, W), label (H', W') int64)
    "cityscapes": (build_segmentation, "cityscapes"),
    "fashion_scenes": (build_fashion_scenes, "fashion_scenes"),
}
SPLITS = ("train", "test")


def _lookup(cfg):
    name = str(cfg.DATASET.DATASET).lower()
    if name not in DATASETS:
        raise DatasetError(f"DATASET.DATASET: unknown dataset {cfg.DATASET.DATASET!r}; "
                           f"known: {', '.join(sorted(DATASETS))}")
    return name, DATASETS[name]


def dataset_dir(cfg) -> str:
    """The folder holding this dataset's files (see the module docstring)."""
    _, (_, sub) = _lookup(cfg)
    root = os.path.expanduser(str(cfg.DATASET.ROOT))
    if cfg.DATA_DIR and not os.path.isabs(root):
        root = os.path.join(os.path.expanduser(str(cfg.DATA_DIR)), root)
    root = os.path.normpath(root)
    return root if os.path.basename(root) == sub else os.path.join(root, sub)


def subsample(dataset: Dataset, percent: float, seed: int) -> Dataset:
    """The first ``round(percent * N)`` indices of a ``seed``-ed permutation (the same subset every run)."""
    if not (0.0 < float(percent) <= 1.0):
        raise DatasetError(f"PERCENT must be in (0, 1], got {percent}")
    if percent >= 1.0:
        return dataset
    n = len(dataset)
    k = max(1, int(round(float(percent) * n)))
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(n, generator=gen)[:k].tolist()
    return Subset(dataset, idx)


def build_dataset(cfg, split: str, augment: bool | None = None) -> Dataset:
    """The ``split`` ("train" or "test") of ``cfg.DATASET.DATASET``.

    ``augment=None`` means ``cfg.DATASET.AUGMENT`` for train and no augmentation for test; pass
    ``augment=False`` for an un-augmented train set (evaluation on the training data). ``cfg.PERCENT < 1``
    keeps a fixed subset of the train split (seeded by ``cfg.SEED``), with or without augmentation.
    """
    if split not in SPLITS:
        raise DatasetError(f"dataset split must be one of {', '.join(SPLITS)}, got {split!r}")
    percent = float(cfg.PERCENT)
    if not (0.0 < percent <= 1.0):  # checked before touching the disk
        raise DatasetError(f"PERCENT must be in (0, 1], got {cfg.PERCENT}")
    name, (builder, _) = _lookup(cfg)
    if augment is None:
        augment = bool(cfg.DATASET.AUGMENT) and split == "train"
    dataset = builder(cfg, dataset_dir(cfg), split, bool(augment))
    if split == "train":
        dataset = subsample(dataset, percent, cfg.SEED)
    return dataset


def build_loader(cfg, split: str, distributed: bool = False, augment: bool | None = None,
                 world_size: int | None = None, rank: int | None = None) -> DataLoader:
    """A DataLoader over ``build_dataset(cfg, split, augment)``.

    The train split always goes through a ``DistributedSampler`` (one replica when not ``distributed``),
    shuffled with ``cfg.SEED`` and the epoch: the order of an epoch depends on nothing else, so a resumed run
    sees the same batches, and N ranks with batch B see exactly the samples one process sees with batch N·B.
    The caller calls ``loader.sampler.set_epoch(epoch)``. The test split is sharded without padding
    (rank r takes samples r, r + N, ...), so metrics summed over ranks count every image once.
    """
    dataset = build_dataset(cfg, split, augment=augment)
    train = split == "train"
    if distributed:
        world_size = dist.get_world_size() if world_size is None else world_size
        rank = dist.get_rank() if rank is None else rank
    else:
        world_size, rank = 1, 0
    if train:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=bool(cfg.TRAIN.SHUFFLE),
                                     seed=int(cfg.SEED), drop_last=False)
    else:
        sampler = range(rank, len(dataset), world_size)
    workers = int(cfg.WORKERS)
    return DataLoader(
        dataset,
        batch_size=int(cfg.TRAIN.BATCH_SIZE_PER_GPU if train else cfg.TEST.BATCH_SIZE_PER_GPU),
        sampler=sampler,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        drop_last=False,
    )
