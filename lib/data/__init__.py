"""Datasets and loaders keyed by ``cfg.DATASET.DATASET``.

``build_dataset(cfg, split)`` returns a torch Dataset; ``build_loader(cfg, split)`` wraps it in a DataLoader
(the train split always through a seeded ``DistributedSampler``, whose ``set_epoch`` the caller calls every
epoch; the test split sharded over ranks without padding).

Where the files live: ``dataset_dir(cfg)`` is ``<DATA_DIR>/<DATASET.ROOT>/<name>`` (``DATA_DIR`` only
prefixes a relative ROOT), except that a ROOT already ending in the dataset's folder name, or one that itself
holds the dataset's files, is used as is, whatever its name: the locuslab/mdeq style ``ROOT: data/cifar10/``
and ``ROOT: data/`` both give ``data/cifar10``, an ImageNet ROOT holding ``<TRAIN_SET>``/``<TEST_SET>``
(folders or ``.rec``) is the ImageNet folder (``run_mdeq.sh --data /datasets/ILSVRC2012``), and a ROOT holding
``train.txt``/``valid.txt``/``test.txt`` is the corpus folder (locuslab/deq's ``--data DIR``). What "holds the
files" means per dataset is the third entry of ``DATASETS``.
Missing files raise :class:`deqlab.errors.DatasetError`; nothing is downloaded unless
``DEQLAB_ALLOW_DOWNLOAD=1``.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from deqlab.data.fashion_scenes import META as FASHION_SCENES_META, build_fashion_scenes
from deqlab.data.segmentation import build_segmentation
from deqlab.data.imagenet import build_imagenet, holds_imagenet
from deqlab.data.vision import build_cifar10, build_fashion_mnist, image_hw
from deqlab.errors import ConfigError, DatasetError

__all__ = ["DATASETS", "build_dataset", "build_loader", "dataset_dir", "set_epoch", "subsample", "image_hw"]

Holds = Callable[[Any, str], bool]  # (cfg, root) -> whether root itself is the dataset's folder


def _holds(*names: str) -> Holds:
    """A root holds the dataset when one of ``names`` (what the builder reads) is in it."""
    return lambda cfg, root: any(os.path.exists(os.path.join(root, n)) for n in names)


# name -> (builder(cfg, folder, split, augment), folder name under DATASET.ROOT, holds(cfg, root))
DATASETS: dict[str, tuple[Callable | None, str, Holds]] = {
    "fashion_mnist": (build_fashion_mnist, "fashion_mnist", _holds("FashionMNIST")),
    "cifar10": (build_cifar10, "cifar10", _holds("cifar-10-batches-py")),
    "imagenet": (build_imagenet, "imagenet", holds_imagenet),
    # segmentation (deqlab.data.segmentation): items (image (3, H, W), label (H', W') int64)
    "cityscapes": (build_segmentation, "cityscapes", _holds("leftImg8bit", "gtFine")),
    "fashion_scenes": (build_fashion_scenes, "fashion_scenes", _holds(FASHION_SCENES_META)),
    # language modelling (deqlab.data.lm, read by the lm task): {train,valid,test}.txt
    "wikitext103": (None, "wikitext-103", _holds("train.txt", "valid.txt", "test.txt")),
    "austen": (None, "austen", _holds("train.txt", "valid.txt", "test.txt")),
}
SPLITS = ("train", "test")


def _lookup(cfg):
    name = str(cfg.DATASET.DATASET).lower()
    if name not in DATASETS:
        raise DatasetError(f"DATASET.DATASET: unknown dataset {cfg.DATASET.DATASET!r}; "
                           f"known: {', '.join(sorted(DATASETS))}")
    return name, DATASETS[name]


def _check_imagenet_options(cfg) -> None:
    """DATA_FORMAT rec and LOADER dali exist for ImageNet-style data only: refuse them elsewhere."""
    if str(cfg.DATASET.DATASET).lower() == "imagenet":
        return
    for key, plain in (("DATA_FORMAT", "jpg"), ("LOADER", "torchvision")):
        if str(cfg.DATASET[key]) != plain:
            raise ConfigError(f"DATASET.{key} {cfg.DATASET[key]} is for ImageNet-style data (DATASET.DATASET "
                              f"imagenet); {cfg.DATASET.DATASET} needs DATASET.{key} {plain}")


def dataset_dir(cfg) -> str:
    """The folder holding this dataset's files (see the module docstring)."""
    _, (_, sub, holds) = _lookup(cfg)
    root = os.path.expanduser(str(cfg.DATASET.ROOT))
    if cfg.DATA_DIR and not os.path.isabs(root):
        root = os.path.join(os.path.expanduser(str(cfg.DATA_DIR)), root)
    root = os.path.normpath(root)
    if os.path.basename(root) == sub or holds(cfg, root):
        return root
    return os.path.join(root, sub)


def _fraction(percent: float) -> float:
    """``percent`` as a float, or a DatasetError unless it is in (0, 1]."""
    if not 0.0 < float(percent) <= 1.0:
        raise DatasetError(f"PERCENT must be in (0, 1], got {percent}")
    return float(percent)


def subsample(dataset: Dataset, percent: float, seed: int) -> Dataset:
    """The first ``round(percent * N)`` indices of a ``seed``-ed permutation (the same subset every run)."""
    percent = _fraction(percent)
    if percent == 1.0:
        return dataset
    n = len(dataset)
    k = max(1, int(round(percent * n)))
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
    percent = _fraction(cfg.PERCENT)  # before touching the disk
    name, (builder, _, _) = _lookup(cfg)
    if builder is None:
        raise ConfigError(f"DATASET.DATASET {name} is a text corpus: train on it with tools/lm_train.py")
    _check_imagenet_options(cfg)
    if augment is None:
        augment = bool(cfg.DATASET.AUGMENT) and split == "train"
    dataset = builder(cfg, dataset_dir(cfg), split, bool(augment))
    if split == "train":
        dataset = subsample(dataset, percent, cfg.SEED)
    return dataset


def build_loader(cfg, split: str, distributed: bool = False, augment: bool | None = None,
                 world_size: int | None = None, rank: int | None = None) -> Iterable:
    """A DataLoader over ``build_dataset(cfg, split, augment)``, or with ``DATASET.LOADER dali`` a
    ``deqlab.data.dali.DaliLoader`` giving the same batches (images NCHW float, labels int64).

    The train split always goes through a ``DistributedSampler`` (one replica when not ``distributed``),
    shuffled with ``cfg.SEED`` and the epoch: the order of an epoch depends on nothing else, so a resumed run
    sees the same batches, and N ranks with batch B see exactly the samples one process sees with batch N·B.
    The caller calls ``set_epoch(loader, epoch)``. The test split is sharded without padding
    (rank r takes samples r, r + N, ...), so metrics summed over ranks count every image once.
    """
    _check_imagenet_options(cfg)
    if distributed:
        world_size = dist.get_world_size() if world_size is None else world_size
        rank = dist.get_rank() if rank is None else rank
    else:
        world_size, rank = 1, 0
    if str(cfg.DATASET.LOADER) == "dali":
        from deqlab.data.dali import build_dali_loader  # DALI is an optional extra
        if augment is None:
            augment = bool(cfg.DATASET.AUGMENT) and split == "train"
        return build_dali_loader(cfg, dataset_dir(cfg), split, augment, world_size, rank)
    dataset = build_dataset(cfg, split, augment=augment)
    train = split == "train"
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


def set_epoch(loader: Iterable, epoch: int) -> None:
    """Start ``epoch`` of a train loader: reseeds its DistributedSampler's shuffle (a DALI loader's reader
    reshuffles by itself)."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
