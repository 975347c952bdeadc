"""Dataset builders: Fashion-MNIST and CIFAR-10 on torchvision's own classes (ImageNet: ``deqlab.data.imagenet``).

Each builder takes ``(cfg, folder, split, augment)`` where ``folder`` is the dataset's directory (see
``deqlab.data.dataset_dir``) and returns a ``torch.utils.data.Dataset`` of ``(image tensor, int label)``.
Nothing is downloaded unless the environment variable ``DEQLAB_ALLOW_DOWNLOAD=1`` is set.
"""
from __future__ import annotations

import gzip
import os
import shutil

from torchvision import datasets, transforms

from deqlab.errors import DatasetError
from deqlab.utils.files import atomic_open

FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

DEBIAN_FASHION_DIR = "/usr/share/datasets/fashion-mnist"  # from `apt-get install dataset-fashion-mnist`
FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")


def download_allowed() -> bool:
    return os.environ.get("DEQLAB_ALLOW_DOWNLOAD", "").strip() == "1"


def download_or_fail(message: str) -> bool:
    """True when downloads are allowed (DEQLAB_ALLOW_DOWNLOAD=1), else a DatasetError with ``message``."""
    if not download_allowed():
        raise DatasetError(message)
    return True


def image_hw(cfg) -> tuple[int, int]:
    """``MODEL.IMAGE_SIZE`` is ``[width, height]`` (defaults.py, HRNet/MDEQ convention); returns (H, W)."""
    size = list(cfg.MODEL.IMAGE_SIZE)
    if len(size) != 2 or any(int(s) <= 0 for s in size):
        raise DatasetError(f"MODEL.IMAGE_SIZE must be [width, height] of positive ints, got {size}")
    return int(size[1]), int(size[0])


def normalisation(cfg, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input normalisation: ``DATASET.MEAN`` / ``DATASET.STD`` where set (one value per channel, checked by
    the config rules), else the dataset's usual ``mean`` / ``std``."""
    return (tuple(cfg.DATASET.MEAN) or mean), (tuple(cfg.DATASET.STD) or std)


def _resize_if_needed(cfg, native: int) -> list:
    hw = image_hw(cfg)
    return [] if hw == (native, native) else [transforms.Resize(hw)]


# ---------------------------------------------------------------- Fashion-MNIST
def _gunzip_atomic(src: str, dst: str) -> None:
    """Decompress ``src`` into ``dst`` atomically (safe when several ranks extract at once)."""
    with atomic_open(dst, "wb") as out, gzip.open(src, "rb") as inp:
        shutil.copyfileobj(inp, out, length=1 << 20)


def ensure_fashion_mnist_raw(folder: str) -> bool:
    """Make ``<folder>/FashionMNIST/raw/*-ubyte`` exist, gunzipping from ``raw/*.gz`` or the Debian package
    folder (``$DEQLAB_FASHION_MNIST_DEBIAN``, default /usr/share/datasets/fashion-mnist). Returns True when
    all four files are present afterwards."""
    raw = os.path.join(folder, "FashionMNIST", "raw")
    missing = [f for f in FASHION_FILES if not os.path.isfile(os.path.join(raw, f))]
    if not missing:
        return True
    debian = os.environ.get("DEQLAB_FASHION_MNIST_DEBIAN", DEBIAN_FASHION_DIR)
    sources = {}
    for name in missing:
        for src_dir in (raw, debian):
            gz = os.path.join(src_dir, name + ".gz")
            if os.path.isfile(gz):
                sources[name] = gz
                break
    if len(sources) != len(missing):
        return False
    os.makedirs(raw, exist_ok=True)
    for name, gz in sources.items():
        try:
            _gunzip_atomic(gz, os.path.join(raw, name))
        except (OSError, EOFError) as err:
            raise DatasetError(f"fashion_mnist: cannot extract {gz} into {raw}: {err}; reinstall with "
                               f"`apt-get install --reinstall dataset-fashion-mnist`") from err
    return True


def _small_image_transforms(cfg, native: int, pad: int, mean, std, augment: bool) -> transforms.Compose:
    """Random crop (``pad``) + flip when ``augment``, a resize if MODEL.IMAGE_SIZE differs, then normalise
    (``mean``/``std`` unless the config sets DATASET.MEAN/STD)."""
    tf = [transforms.RandomCrop(native, padding=pad), transforms.RandomHorizontalFlip()] if augment else []
    tf += _resize_if_needed(cfg, native)
    return transforms.Compose(tf + [transforms.ToTensor(), transforms.Normalize(*normalisation(cfg, mean, std))])


def build_fashion_mnist(cfg, folder: str, split: str, augment: bool):
    raw = os.path.join(folder, "FashionMNIST", "raw")
    download = False
    if not ensure_fashion_mnist_raw(folder):
        debian = os.environ.get("DEQLAB_FASHION_MNIST_DEBIAN", DEBIAN_FASHION_DIR)
        download = download_or_fail(
            f"fashion_mnist: raw files not found in {raw} (need {', '.join(FASHION_FILES)}) nor as .gz "
            f"in {debian}; install them with `apt-get install dataset-fashion-mnist`, or set "
            f"DEQLAB_ALLOW_DOWNLOAD=1 to let torchvision download into {folder}")
    tf = _small_image_transforms(cfg, 28, 2, FASHION_MEAN, FASHION_STD, augment)
    try:
        return datasets.FashionMNIST(folder, train=(split == "train"), transform=tf,
                                     download=download)
    except (RuntimeError, OSError, ValueError) as err:  # truncated / malformed idx files, failed download
        raise DatasetError(f"fashion_mnist: cannot read {raw}: {err}; reinstall with `apt-get install "
                           f"--reinstall dataset-fashion-mnist` or delete {raw} and set "
                           f"DEQLAB_ALLOW_DOWNLOAD=1") from err


# ---------------------------------------------------------------- CIFAR-10
class LenientCIFAR10(datasets.CIFAR10):
    """torchvision's CIFAR10 that only checks that the batch files exist.

    torchvision compares every batch file (and ``batches.meta``) with the md5 sums of the official archive,
    so trees that were re-pickled (another protocol, a converted copy, a home-made subset, a test fixture)
    are rejected with a misleading "corrupted" error although their content is fine. A real corruption
    still fails loudly while unpickling, which ``build_cifar10`` reports as a DatasetError.
    """

    meta = {**datasets.CIFAR10.meta, "md5": None}  # check_integrity(path, None) == "file exists"

    def _check_integrity(self) -> bool:
        return all(os.path.isfile(os.path.join(self.root, self.base_folder, f))
                   for f, _ in self.train_list + self.test_list)


def build_cifar10(cfg, folder: str, split: str, augment: bool):
    batches = os.path.join(folder, LenientCIFAR10.base_folder)
    missing = [f for f in CIFAR_FILES if not os.path.isfile(os.path.join(batches, f))]
    download = bool(missing) and download_or_fail(
        f"cifar10: missing {', '.join(missing)} in {batches}; unpack "
        f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz into {folder}, or set "
        f"DEQLAB_ALLOW_DOWNLOAD=1 to let torchvision download it")
    tf = _small_image_transforms(cfg, 32, 4, CIFAR_MEAN, CIFAR_STD, augment)
    try:
        return LenientCIFAR10(folder, train=(split == "train"), transform=tf,
                              download=download)
    except Exception as err:  # unpickling errors come in many types (UnpicklingError, EOFError, KeyError...)
        raise DatasetError(f"cifar10: cannot read {batches}: {type(err).__name__}: {err}; re-unpack "
                           f"cifar-10-python.tar.gz into {folder}") from err
