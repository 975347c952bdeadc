"""Semantic segmentation data in the Cityscapes layout of locuslab/mdeq (HRNet-Semantic-Segmentation).

On disk (``folder`` = ``deqlab.data.dataset_dir(cfg)``, e.g. ``data/cityscapes``)::

    data/list/cityscapes/train.lst     "leftImg8bit/train/<city>/<n>_leftImg8bit.png gtFine/train/<city>/<n>_gtFine_labelIds.png"
    data/cityscapes/leftImg8bit/...    images (any mode PIL reads; converted to RGB)
    data/cityscapes/gtFine/...         single-channel label PNGs

The original opened ``ROOT + TRAIN_SET`` (``data/`` + ``list/cityscapes/train.lst``) and joined the paths of a
line to ``ROOT/cityscapes``. Here a list path is looked up relative to the parent of ``folder`` (the
original's ROOT) and then relative to ``folder`` itself (self-contained trees such as the generated
``fashion_scenes``); absolute paths are used as they are. A list whose file name contains ``test`` may leave
out the label column (labels are then all ignore), every other list needs both columns.

Items are ``(image float32 (3, H, W) ImageNet-normalised, label int64 (H', W'))``. Training items follow
the original ``gen_sample``: random rescale of the long side to ``BASE_SIZE * (0.5 + randint(0, SCALE_FACTOR)
/ 10)`` (``MULTI_SCALE``), zero / ignore padding and a random crop to ``TRAIN.IMAGE_SIZE``, a random
horizontal flip (``FLIP``), the label subsampled by ``DOWNSAMPLERATE`` (nearest, OpenCV's pixel choice).
Rescaling uses PIL (bilinear images, nearest labels; unlike the original's OpenCV, PIL antialiases when it
shrinks) because ``F.interpolate`` is slow with several threads on few cores. The random draws come from torch's default generator, which the engine seeds and DataLoader workers derive
their seeds from. Test items are whole images with full-resolution labels.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from cityscapesscripts.helpers.labels import labels as CITYSCAPES_LABELS
from PIL import Image
from torch.utils.data import Dataset

from deqlab.data.images import decode_image
from deqlab.data.vision import IMAGENET_MEAN, IMAGENET_STD
from deqlab.errors import ConfigError, DatasetError

LABEL_MAPPINGS = ("cityscapes", "none")


def label_lut(mapping: str, ignore_label: int) -> np.ndarray:
    """A 256-entry int64 table from the value stored in a label PNG to the training label.

    ``cityscapes``: Cityscapes label ids to trainIds after ``cityscapesscripts``; ids whose trainId is 255
    or -1, and values the table lacks, become ``ignore_label``. ``none``: values as they are, 255 -> ignore.
    """
    if mapping == "cityscapes":
        lut = np.full(256, ignore_label, dtype=np.int64)
        for lab in CITYSCAPES_LABELS:
            if 0 <= lab.id < 256 and lab.trainId not in (255, -1):
                lut[lab.id] = lab.trainId
    elif mapping == "none":
        lut = np.arange(256, dtype=np.int64)
        lut[255] = ignore_label
    else:
        raise ConfigError(f"DATASET.LABEL_MAPPING: unknown mapping {mapping!r}; known: {', '.join(LABEL_MAPPINGS)}")
    return lut


@dataclass(frozen=True)
class SegFile:
    image: str
    label: str | None  # None: a test-list line without labels
    name: str


@dataclass(frozen=True)
class SegAugment:
    """The training transform's settings (``TRAIN.*`` keys); crop is (h, w)."""
    crop: tuple[int, int]
    base_size: int
    scale_factor: int
    multi_scale: bool
    flip: bool
    downsample_rate: float


def find_list(folder: str, list_path: str, key: str) -> str:
    """The list file for ``list_path`` (see the module docstring for where it is looked up)."""
    candidates = [os.path.join(os.path.dirname(folder), list_path), os.path.join(folder, list_path)]
    for path in dict.fromkeys(os.path.normpath(c) for c in candidates):
        if os.path.isfile(path):
            return path
    raise DatasetError(f"{key}: list file not found at {' or '.join(dict.fromkeys(candidates))}; expected a "
                       f"file of 'image_path label_path' lines (paths relative to {folder}), "
                       f"e.g. {key} list/cityscapes/train.lst")


def _png_size(path: str) -> tuple[int, int]:
    try:
        with Image.open(path) as img:
            return img.size
    except OSError as err:  # unreadable / truncated / not an image (PIL raises OSError subclasses)
        raise DatasetError(f"{path}: cannot read the image: {err}") from err


def _check_sizes(item: SegFile, image_wh: tuple[int, int], label_wh: tuple[int, int]) -> None:
    if image_wh != label_wh:
        raise DatasetError(f"{item.label}: label is {label_wh[0]}x{label_wh[1]} (WxH) but its image {item.image} "
                           f"is {image_wh[0]}x{image_wh[1]}; they must match")


def read_list(path: str, folder: str) -> list[SegFile]:
    """Parse a list file; every line's files must exist under ``folder`` with equal image and label sizes."""
    label_optional = "test" in os.path.basename(path)
    need = "1 or 2 columns (image_path [label_path])" if label_optional else "2 columns (image_path label_path)"
    files = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            cols = line.split()
            if not cols:
                continue
            if len(cols) > 2 or (len(cols) < 2 and not label_optional):
                raise DatasetError(f"{path}:{lineno}: expected {need}, got {len(cols)}: {line.strip()!r}")
            paths = [os.path.join(folder, c) for c in cols]
            for p in paths:
                if not os.path.isfile(p):
                    kind = "image" if p is paths[0] else "label"
                    raise DatasetError(f"{path}:{lineno}: {kind} file not found: {p}")
            item = SegFile(paths[0], paths[1] if len(paths) == 2 else None,
                           os.path.splitext(os.path.basename(cols[0]))[0])
            if item.label is not None:  # PNG headers only: ~0.1 ms a pair, so every list is checked up front
                _check_sizes(item, _png_size(item.image), _png_size(item.label))
            files.append(item)
    if not files:
        raise DatasetError(f"{path}: list file has no entries; expected 'image_path label_path' lines")
    return files


# ---------------------------------------------------------------- transforms
_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def normalise(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB in [0, 255] -> ImageNet mean/std normalised."""
    return (image / 255.0 - _MEAN) / _STD


def rescale(image: Image.Image, label: Image.Image | None, long_side: int) -> tuple[Image.Image, Image.Image | None]:
    """Long side to ``long_side``, aspect kept (rounded as the original's ``image_resize``); image bilinear,
    label nearest."""
    w, h = image.size
    size = (int(w * long_side / h + 0.5), long_side) if h > w else (long_side, int(h * long_side / w + 0.5))
    return image.resize(size, Image.BILINEAR), None if label is None else label.resize(size, Image.NEAREST)


def pad_and_crop(image: torch.Tensor, label: torch.Tensor, crop: tuple[int, int],
                 ignore_label: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad bottom/right to at least ``crop`` (image 0, label ignore), then a random (h, w) window."""
    h, w = image.shape[-2:]
    ph, pw = max(crop[0] - h, 0), max(crop[1] - w, 0)
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph), value=0.0)
        label = F.pad(label, (0, pw, 0, ph), value=ignore_label)
    h, w = image.shape[-2:]
    x = int(torch.randint(0, w - crop[1] + 1, ()))
    y = int(torch.randint(0, h - crop[0] + 1, ()))
    return image[:, y:y + crop[0], x:x + crop[1]], label[y:y + crop[0], x:x + crop[1]]


def downsample_label(label: torch.Tensor, rate: float) -> torch.Tensor:
    """Nearest subsampling by ``rate`` as OpenCV's ``resize(fx=1/rate, INTER_NEAREST)`` (pixel floor(i * rate))."""
    if rate == 1:
        return label
    h, w = label.shape
    out_h, out_w = max(int(h / rate + 0.5), 1), max(int(w / rate + 0.5), 1)
    rows = (torch.arange(out_h, dtype=torch.float64) * rate).floor().long().clamp_(max=h - 1)
    cols = (torch.arange(out_w, dtype=torch.float64) * rate).floor().long().clamp_(max=w - 1)
    return label[rows][:, cols]


# ---------------------------------------------------------------- dataset
class SegmentationList(Dataset):
    """Images and label PNGs named by a list file; ``augment`` None gives whole images.

    ``files[i]`` is the i-th :class:`SegFile` (image and label paths, ``name`` = image file stem).
    """

    def __init__(self, folder: str, list_file: str, lut: np.ndarray, num_classes: int, ignore_label: int,
                 augment: SegAugment | None = None):
        self.folder, self.list_file = folder, list_file
        self.files = read_list(list_file, folder)
        self.lut, self.num_classes, self.ignore_label = lut, num_classes, ignore_label
        self.augment = augment

    def __len__(self) -> int:
        return len(self.files)

    def _map_label(self, label: Image.Image, path: str) -> torch.Tensor:
        raw = np.asarray(label).astype(np.int64)
        if raw.ndim != 2:
            raise DatasetError(f"{path}: expected a single-channel label PNG (class ids), got shape {raw.shape}")
        out = np.full(raw.shape, self.ignore_label, dtype=np.int64)
        inside = (raw >= 0) & (raw < len(self.lut))  # 16-bit PNGs may hold values the table lacks
        out[inside] = self.lut[raw[inside]]
        bad = (out >= self.num_classes) & (out != self.ignore_label)
        if bad.any():
            raise DatasetError(f"{path}: label values {sorted(set(out[bad].tolist()))[:8]} are neither below "
                               f"DATASET.NUM_CLASSES={self.num_classes} nor the ignore label {self.ignore_label} "
                               f"(check DATASET.LABEL_MAPPING / NUM_CLASSES)")
        return torch.from_numpy(out)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        item, aug = self.files[index], self.augment
        image = decode_image(item.image, item.image, "RGB")
        label = None if item.label is None else decode_image(item.label, item.label)
        if label is not None:
            _check_sizes(item, image.size, label.size)
        if aug is not None and aug.multi_scale:
            scale = 0.5 + int(torch.randint(0, aug.scale_factor + 1, ())) / 10.0
            image, label = rescale(image, label, int(aug.base_size * scale + 0.5))
        # HWC uint8 -> CHW float32 in numpy: torch's threaded strided copy is slow on busy small machines
        img = torch.from_numpy(np.ascontiguousarray(np.asarray(image, dtype=np.float32).transpose(2, 0, 1)))
        if label is None:
            lab = torch.full(img.shape[1:], self.ignore_label, dtype=torch.long)
        else:
            lab = self._map_label(label, item.label)
        if aug is None:
            return normalise(img), lab
        # The original crops only inside its multi-scale branch; we always crop so that TRAIN.IMAGE_SIZE holds.
        img, lab = pad_and_crop(img, lab, aug.crop, self.ignore_label)
        img = normalise(img)
        if aug.flip and int(torch.randint(0, 2, ())):
            img, lab = img.flip(-1), lab.flip(-1)
        return img.contiguous(), downsample_label(lab, aug.downsample_rate).contiguous()


def build_segmentation(cfg, folder: str, split: str, augment: bool) -> SegmentationList:
    """The Cityscapes-layout reader for ``split``: TRAIN_SET with the training transform when ``augment``,
    else the list's whole images (TEST_SET for "test")."""
    key = "DATASET.TRAIN_SET" if split == "train" else "DATASET.TEST_SET"
    list_file = find_list(folder, str(cfg.DATASET.TRAIN_SET if split == "train" else cfg.DATASET.TEST_SET), key)
    ignore = int(cfg.TRAIN.IGNORE_LABEL)
    lut = label_lut(str(cfg.DATASET.LABEL_MAPPING).lower(), ignore)
    aug = None
    if augment:
        size = [int(s) for s in cfg.TRAIN.IMAGE_SIZE]
        if len(size) != 2 or min(size) <= 0 or float(cfg.TRAIN.DOWNSAMPLERATE) <= 0:
            raise ConfigError(f"TRAIN.IMAGE_SIZE must be [width, height] > 0 and TRAIN.DOWNSAMPLERATE > 0, got "
                              f"{list(cfg.TRAIN.IMAGE_SIZE)} and {cfg.TRAIN.DOWNSAMPLERATE}")
        aug = SegAugment(crop=(size[1], size[0]), base_size=int(cfg.TRAIN.BASE_SIZE),
                         scale_factor=int(cfg.TRAIN.SCALE_FACTOR), multi_scale=bool(cfg.TRAIN.MULTI_SCALE),
                         flip=bool(cfg.TRAIN.FLIP), downsample_rate=float(cfg.TRAIN.DOWNSAMPLERATE))
    return SegmentationList(folder, list_file, lut, int(cfg.DATASET.NUM_CLASSES), ignore, aug)
