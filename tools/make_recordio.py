"""Pack a class-folder image tree into MXNet recordIO for DALI (``DATASET.DATA_FORMAT rec``).

Example (each split once)::

    python tools/make_recordio.py --src data/imagenet/train --out data/imagenet/train --resize 480 --quality 95
    python tools/make_recordio.py --src data/imagenet/val   --out data/imagenet/val

writes ``OUT.rec``, ``OUT.idx``, ``OUT.lst`` (im2rec's list: key, label, path) and ``OUT.classes.txt`` (label,
class folder). Labels are the sorted class-folder names' indices, as torchvision's ImageFolder numbers them.
``--resize N`` re-encodes every image with its shorter side at N pixels (JPEG ``--quality``); without it, JPEG
files are stored byte for byte and other formats re-encoded as JPEG. Every image is decoded first: a damaged
one stops the packing with an error naming it. Every file is written atomically, and existing ones are kept
unless ``--force``.
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path

from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from tqdm import tqdm

from deqlab.data.images import decode_image
from deqlab.data.recordio import RecordIOWriter
from deqlab.engine.cli import run_tool
from deqlab.errors import DatasetError
from deqlab.utils.files import atomic_open
from deqlab.utils.tool_help import help_format

OUTPUTS = (".rec", ".idx", ".lst", ".classes.txt")


def encode(path: str, resize: int, quality: int) -> bytes:
    """The bytes to store for the image at ``path`` (see the module docstring); a DatasetError naming the file
    when it cannot be decoded, so that no damaged image is packed (its reader would fail mid-training)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise DatasetError(f"cannot read image {path}: {err}") from None
    if resize <= 0 and raw[:3] == b"\xff\xd8\xff":  # a JPEG already: checked, then stored unchanged
        decode_image(raw, path, draft=True)
        return raw
    image = decode_image(raw, path, "RGB")
    if resize > 0:
        w, h = image.size
        scale = resize / min(w, h)
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def make_recordio(src: str | Path, out: str | Path, resize: int = 0, quality: int = 95, force: bool = False,
                  progress: bool = True) -> int:
    """Write ``out.rec``/``.idx``/``.lst``/``.classes.txt`` from the class folders in ``src``; returns the count."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DatasetError(f"--src {src} is not a folder")
    existing = [str(out) + ext for ext in OUTPUTS if Path(str(out) + ext).exists()]
    if existing and not force:
        raise DatasetError(f"--out {out}: {', '.join(existing)} already exist(s); pass --force to overwrite")
    if not 1 <= quality <= 100:
        raise DatasetError(f"--quality must be in 1..100, got {quality}")
    try:
        classes, class_to_idx = find_classes(str(src))
        samples = make_dataset(str(src), class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as err:
        raise DatasetError(f"--src {src} must hold one folder per class with images inside: "
                           f"{' '.join(str(err).split())}") from None
    # leave=False: a bar stopped by a damaged image is erased, so the error line stands alone
    with RecordIOWriter(out) as writer:
        for path, label in tqdm(samples, desc=f"packing {src}", unit="img", disable=not progress, leave=False):
            writer.write(label, encode(path, resize, quality), str(Path(path).relative_to(src)))
    with atomic_open(str(out) + ".classes.txt", "w") as fh:
        fh.writelines(f"{i}\t{name}\n" for i, name in enumerate(classes))
    return writer.count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(**help_format(__doc__))
    parser.add_argument("--src", required=True, help="folder of class folders, e.g. data/imagenet/train")
    parser.add_argument("--out", required=True, help="output prefix, e.g. data/imagenet/train (-> train.rec, ...)")
    parser.add_argument("--resize", type=int, default=0, help="shorter side in pixels (0: keep the images as they are)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding")
    parser.add_argument("--force", action="store_true", help="overwrite existing output files")
    args = parser.parse_args(argv)
    count = make_recordio(args.src, args.out, args.resize, args.quality, args.force)
    print(f"wrote {count} images to {args.out}.rec (index {args.out}.idx)")


if __name__ == "__main__":
    run_tool(main)
