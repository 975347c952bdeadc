"""List files of an official Cityscapes tree (``leftImg8bit_trainvaltest.zip`` + ``gtFine_trainvaltest.zip``
unzipped into one folder), in the layout ``deqlab.data.segmentation`` reads (HRNet / locuslab/mdeq's lists).

One line per image, sorted: ``leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png<TAB>gtFine/<split>/<city>/
<stem>_gtFine_labelIds.png``, paths relative to the Cityscapes folder; the test split's labels are placeholders
on the server's side, so ``test.lst`` lists the images only (as the original's).
"""
from __future__ import annotations

from pathlib import Path

from deqlab.errors import DatasetError

SPLITS = ("train", "val", "test")
IMAGE_SUFFIX, LABEL_SUFFIX = "_leftImg8bit.png", "_gtFine_labelIds.png"


def split_lines(root: str | Path, split: str) -> list[str]:
    """The list lines of ``split`` (empty when the tree has no ``leftImg8bit/<split>``); a train or val image
    without its ``gtFine`` label ids is an error naming the file."""
    root = Path(root)
    lines = []
    for image in sorted((root / "leftImg8bit" / split).glob(f"*/*{IMAGE_SUFFIX}")):
        rel = image.relative_to(root).as_posix()
        if split == "test":
            lines.append(rel)
            continue
        label = Path("gtFine", split, image.parent.name, image.name[:-len(IMAGE_SUFFIX)] + LABEL_SUFFIX)
        if not (root / label).is_file():
            raise DatasetError(f"{root / label}: label ids of {rel} not found (unzip gtFine_trainvaltest.zip "
                               f"into {root})")
        lines.append(f"{rel}\t{label.as_posix()}")
    return lines


def write_lists(root: str | Path, out: str | Path) -> dict[str, int]:
    """Write ``out/<split>.lst`` for every split the tree has; returns the image count of each written."""
    root, out = Path(root), Path(out)
    if not (root / "leftImg8bit").is_dir():
        raise DatasetError(f"{root}: no leftImg8bit/ folder; expected the official Cityscapes layout "
                           f"(leftImg8bit/<split>/<city>/*{IMAGE_SUFFIX}, gtFine/<split>/<city>/*{LABEL_SUFFIX})")
    found = {split: split_lines(root, split) for split in SPLITS}
    if not any(found.values()):
        raise DatasetError(f"{root / 'leftImg8bit'}: no <split>/<city>/*{IMAGE_SUFFIX} images")
    out.mkdir(parents=True, exist_ok=True)
    for split, lines in found.items():
        if lines:
            (out / f"{split}.lst").write_text("\n".join(lines) + "\n")
    return {split: len(lines) for split, lines in found.items() if lines}
