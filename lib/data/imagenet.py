"""ImageNet-style data: class folders of JPEGs or MXNet recordIO, read by torchvision or by DALI.

Where the files are (``folder`` = ``deqlab.data.dataset_dir(cfg)``, set = ``DATASET.TRAIN_SET``/``TEST_SET``):

- ``DATASET.DATA_FORMAT jpg``: ``folder/<set>/<class>/<image>`` (also ``folder/images/<set>/...``, the
  locuslab/mdeq layout). Classes are the sorted folder names, as torchvision's ``ImageFolder`` numbers them;
  the DALI reader gets the same file list and labels, so both loaders agree sample for sample.
- ``DATASET.DATA_FORMAT rec``: ``folder/<set>.rec`` + ``folder/<set>.idx`` (``tools/make_recordio.py``).

The transforms are the standard ones, sized from ``MODEL.IMAGE_SIZE`` (H, W): train = random-resized crop
(area 0.08-1, aspect 3/4-4/3) + horizontal flip; eval = shorter side resized to ``H / 0.875`` (256 for 224)
+ centre crop; both normalised with the ImageNet mean and std. ``deqlab.data.dali`` builds the same in DALI.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from deqlab.data.images import decode_image
from deqlab.data.recordio import RecordIODataset, open_recordio
from deqlab.data.vision import IMAGENET_MEAN, IMAGENET_STD, image_hw, normalisation
from deqlab.errors import DatasetError

RRC_AREA, RRC_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
CROP_FRACTION = 0.875  # eval: centre crop of a 1 / 0.875 larger resize (224 of 256)


class ImageSource(NamedTuple):
    """Where a split's images are: ``files``/``labels`` (class folders) or ``rec`` (recordIO)."""
    format: str
    path: Path
    files: list[str] | None = None
    labels: list[int] | None = None
    classes: list[str] | None = None
    rec: Path | None = None


def eval_resize(hw: tuple[int, int]) -> int:
    """The shorter-side size before the centre crop: 256 for a 224 crop."""
    return int(max(hw) / CROP_FRACTION)


def _split_name(cfg, split: str) -> tuple[str, str]:
    key = "TRAIN_SET" if split == "train" else "TEST_SET"
    return str(cfg.DATASET[key]), f"DATASET.{key}"


def holds_imagenet(cfg, root: str) -> bool:
    """Whether ``root`` itself holds the train or test set (as class folders or a ``.rec``)."""
    names = (str(cfg.DATASET.TRAIN_SET), str(cfg.DATASET.TEST_SET))
    return any((Path(root) / n).is_dir() or (Path(root) / f"{n}.rec").is_file() for n in names)


def image_source(cfg, folder: str, split: str) -> ImageSource:
    """Find and check ``split``'s images; one-line DatasetErrors for anything that is not an ImageNet layout."""
    name, key = _split_name(cfg, split)
    fmt = str(cfg.DATASET.DATA_FORMAT)
    if fmt == "rec":
        rec = Path(folder) / f"{name}.rec"
        if not rec.is_file():
            raise DatasetError(f"imagenet: no recordIO file {rec} (DATASET.DATA_FORMAT rec reads <ROOT>/{name}.rec "
                               f"and .idx; {key} names them); build it with tools/make_recordio.py --src "
                               f"<class folders> --out {rec.with_suffix('')}")
        return ImageSource("rec", rec, rec=open_recordio(rec).rec)
    candidates = [Path(folder) / name, Path(folder) / "images" / name]
    path = next((c for c in candidates if c.is_dir()), None)
    if path is None:
        raise DatasetError(f"imagenet: no {split} folder at {' or '.join(map(str, candidates))}; the data folder "
                           f"must hold {name}/<class>/<image> ({key} names the folder), or set DATASET.DATA_FORMAT "
                           f"rec for recordIO files")
    try:
        classes, class_to_idx = find_classes(str(path))
        samples = make_dataset(str(path), class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as err:  # no class folders, or a class folder without images
        raise DatasetError(f"imagenet: {path} is not a folder of class folders with images: "
                           f"{' '.join(str(err).split())}") from None
    return ImageSource("jpg", path, [s[0] for s in samples], [s[1] for s in samples], classes)


def torchvision_transform(cfg, augment: bool) -> transforms.Compose:
    h, w = image_hw(cfg)
    if augment:
        tf = [transforms.RandomResizedCrop((h, w), scale=RRC_AREA, ratio=RRC_RATIO), transforms.RandomHorizontalFlip()]
    else:
        tf = [transforms.Resize(eval_resize((h, w))), transforms.CenterCrop((h, w))]
    normalize = transforms.Normalize(*normalisation(cfg, IMAGENET_MEAN, IMAGENET_STD))
    return transforms.Compose(tf + [transforms.ToTensor(), normalize])


class _FileList(datasets.VisionDataset):
    """The scanned ``(file, label)`` list of a class-folder tree (exactly what ImageFolder would load)."""

    def __init__(self, source: ImageSource, transform) -> None:
        super().__init__(str(source.path), transform=transform)
        self.samples = list(zip(source.files, source.labels))
        self.classes = source.classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return self.transform(decode_image(path, path, "RGB")), label


def build_imagenet(cfg, folder: str, split: str, augment: bool):
    """The torchvision loader's dataset (``DATASET.LOADER torchvision``) for either data format."""
    source = image_source(cfg, folder, split)
    transform = torchvision_transform(cfg, augment)
    if source.format == "rec":
        return RecordIODataset(source.rec, transform)
    return _FileList(source, transform)


__all__ = ["ImageSource", "holds_imagenet", "image_source", "build_imagenet", "torchvision_transform", "eval_resize",
           "RRC_AREA", "RRC_RATIO"]
