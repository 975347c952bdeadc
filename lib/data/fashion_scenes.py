"""``fashion_scenes``: a small real-image segmentation set generated from Fashion-MNIST.

Each scene is a 64x128 RGB canvas (Cityscapes' 1:2 aspect) with a smooth, noisy coloured background and
3-6 Fashion-MNIST items pasted at random positions, each resized to 28-48 pixels and tinted with a random
colour; later items occlude earlier ones. A pixel's label is the class (1-10) of the topmost item whose
(resized) intensity there exceeds ``VISIBLE_THRESHOLD``, and 0 (background) elsewhere: 11 classes, read
with ``DATASET.LABEL_MAPPING none``. Training scenes use the Fashion-MNIST train split, validation scenes
the test split. The tree is written in the Cityscapes layout so that ``deqlab.data.segmentation`` reads it::

    <folder>/leftImg8bit/{train,val}/scene/scene_NNNNN_leftImg8bit.png
    <folder>/gtFine/{train,val}/scene/scene_NNNNN_gtFine_labelIds.png
    <folder>/list/fashion_scenes/{train,val}.lst
    <folder>/fashion_scenes.json      generation parameters; written last, marks a complete tree
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
from PIL import Image
from tqdm import tqdm

from deqlab.data.segmentation import SegmentationList, build_segmentation
from deqlab.data.vision import DEBIAN_FASHION_DIR, download_or_fail, ensure_fashion_mnist_raw
from deqlab.errors import ConfigError, DatasetError

SCENE_HW = (64, 128)
N_TRAIN, N_VAL, SEED = 6000, 1000, 0
ITEMS_PER_SCENE = (3, 6)       # inclusive range
ITEM_SIZE = (28, 48)           # inclusive range of the pasted side length in pixels
VISIBLE_THRESHOLD = 40         # an item pixel is visible (and labelled) when its intensity exceeds this
BACKGROUND_MAX = 60            # background blobs take values 0..BACKGROUND_MAX (plus noise of std 6)
ITEM_FLOOR = 115               # item intensities 0..255 are painted as ITEM_FLOOR..255 (then tinted by 0.7-1),
                               # so every labelled pixel (>= 96) stands out from the background (<= ~80)
TINT = (0.7, 1.0)              # per-channel colour gains of an item
GENERATOR_VERSION = 2          # bump when the scenes change: an older tree on disk is then refused
NUM_CLASSES = 11               # background + the 10 Fashion-MNIST classes
META = "fashion_scenes.json"
SPLITS = {"train": "train", "val": "t10k"}  # scene split -> Fashion-MNIST file prefix


def read_idx(path: str) -> np.ndarray:
    """An uncompressed IDX file (big-endian header: magic with the number of dims, then the dims)."""
    with open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(fashion_dir: str, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) uint8) of the ``train`` or ``t10k`` split under
    ``<fashion_dir>/FashionMNIST/raw``, extracted from the Debian package when needed."""
    raw = os.path.join(fashion_dir, "FashionMNIST", "raw")
    if not ensure_fashion_mnist_raw(fashion_dir):
        debian = os.environ.get("DEQLAB_FASHION_MNIST_DEBIAN", DEBIAN_FASHION_DIR)
        download_or_fail(f"fashion_scenes: Fashion-MNIST raw files not found in {raw} nor as .gz in {debian}; "
                         f"install them with `apt-get install dataset-fashion-mnist`, or set "
                         f"DEQLAB_ALLOW_DOWNLOAD=1 to let torchvision download into {fashion_dir}")
        from torchvision.datasets import FashionMNIST
        FashionMNIST(fashion_dir, train=True, download=True)
    try:
        images = read_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"))
    except (OSError, ValueError, IndexError) as err:
        raise DatasetError(f"fashion_scenes: cannot read {raw}/{prefix}-*-ubyte: {err}; delete {raw} to "
                           f"extract it again") from err
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise DatasetError(f"fashion_scenes: {raw}/{prefix}-*-ubyte hold images {images.shape} and labels "
                           f"{labels.shape}; expected (N, 28, 28) and (N,)")
    return images, labels


def background(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    """Smooth colour blobs (a 4x8 grid upsampled bilinearly) plus pixel noise, dark enough for items to show."""
    grid = rng.integers(0, BACKGROUND_MAX + 1, size=(4, 8, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(grid).resize((hw[1], hw[0]), Image.BILINEAR), dtype=np.float64)
    return np.clip(smooth + rng.normal(0.0, 6.0, size=smooth.shape), 0, 255).astype(np.uint8)


def paste_item(canvas: np.ndarray, label: np.ndarray, item: np.ndarray, cls: int, top: int, left: int,
               tint: np.ndarray) -> None:
    """Paste a grayscale ``item`` (h, w) in place: where its intensity exceeds ``VISIBLE_THRESHOLD`` the
    canvas takes the intensity lifted above the background (``ITEM_FLOOR`` .. 255) times ``tint`` and the
    label ``cls + 1``; elsewhere both stay as they are. A labelled pixel is thus always visible."""
    h, w = item.shape
    visible = item > VISIBLE_THRESHOLD
    lifted = ITEM_FLOOR + (255 - ITEM_FLOOR) * item.astype(np.float64) / 255
    colour = np.rint(lifted[..., None] * tint).astype(np.uint8)
    canvas[top:top + h, left:left + w][visible] = colour[visible]
    label[top:top + h, left:left + w][visible] = cls + 1


def make_scene(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray,
               hw: tuple[int, int] = SCENE_HW) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (RGB uint8 (H, W, 3), label uint8 (H, W)) from items drawn out of ``images``/``labels``."""
    canvas = background(rng, hw)
    label = np.zeros(hw, dtype=np.uint8)
    for _ in range(int(rng.integers(ITEMS_PER_SCENE[0], ITEMS_PER_SCENE[1] + 1))):
        idx = int(rng.integers(len(images)))
        size = int(rng.integers(ITEM_SIZE[0], ITEM_SIZE[1] + 1))
        item = images[idx]
        if size != item.shape[0]:
            item = np.asarray(Image.fromarray(item).resize((size, size), Image.BILINEAR))
        top = int(rng.integers(0, hw[0] - size + 1))
        left = int(rng.integers(0, hw[1] - size + 1))
        paste_item(canvas, label, item, int(labels[idx]), top, left, rng.uniform(*TINT, size=3))
    return canvas, label


def _complete(folder: str, params: dict) -> bool:
    """True when ``folder`` holds a finished tree made with ``params``; DatasetError when it holds another."""
    meta = os.path.join(folder, META)
    if not os.path.isfile(meta):
        if os.path.isdir(folder) and os.listdir(folder):
            raise DatasetError(f"fashion_scenes: {folder} exists but is not a complete generated tree (no {META}); "
                               f"delete it to generate the scenes again")
        return False
    with open(meta) as fh:
        found = json.load(fh)
    if found != params:
        raise DatasetError(f"fashion_scenes: {folder} was generated with {found}, not {params}; delete it to "
                           f"generate the scenes again")
    return True


def _write_split(tmp: str, split: str, n: int, seed: int, fashion_dir: str, bar: tqdm) -> None:
    images, labels = load_fashion_mnist(fashion_dir, SPLITS[split])
    rng = np.random.default_rng([seed, list(SPLITS).index(split)])  # val scenes do not depend on n_train
    img_dir = os.path.join("leftImg8bit", split, "scene")
    lab_dir = os.path.join("gtFine", split, "scene")
    for d in (img_dir, lab_dir):
        os.makedirs(os.path.join(tmp, d))
    lines = []
    for i in range(n):
        image, label = make_scene(rng, images, labels)
        img_path = os.path.join(img_dir, f"scene_{i:05d}_leftImg8bit.png")
        lab_path = os.path.join(lab_dir, f"scene_{i:05d}_gtFine_labelIds.png")
        Image.fromarray(image).save(os.path.join(tmp, img_path), compress_level=1)
        Image.fromarray(label).save(os.path.join(tmp, lab_path), compress_level=1)
        lines.append(f"{img_path} {lab_path}\n")
        bar.update()
    list_dir = os.path.join(tmp, "list", "fashion_scenes")
    os.makedirs(list_dir, exist_ok=True)
    with open(os.path.join(list_dir, f"{split}.lst"), "w") as fh:
        fh.writelines(lines)


def generate_fashion_scenes(folder: str, n_train: int = N_TRAIN, n_val: int = N_VAL, seed: int = SEED,
                            fashion_dir: str | None = None) -> bool:
    """Write the scene tree into ``folder`` unless it is already there; True when this call wrote it.

    The same arguments give the same files. ``fashion_dir`` holds (or receives) ``FashionMNIST/raw``;
    default ``<parent of folder>/fashion_mnist``, the folder the ``fashion_mnist`` dataset uses. The tree is
    built in a temporary folder beside ``folder`` and renamed into place, so several processes may call this
    at once: the first rename wins and the others keep its tree.
    """
    folder = os.path.normpath(folder)
    params = {"n_train": int(n_train), "n_val": int(n_val), "seed": int(seed), "hw": list(SCENE_HW),
              "version": GENERATOR_VERSION}
    if _complete(folder, params):
        return False
    parent = os.path.dirname(folder)
    fashion_dir = fashion_dir or os.path.join(parent, "fashion_mnist")
    os.makedirs(parent or ".", exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent or ".", prefix=f".{os.path.basename(folder)}.", suffix=".tmp")
    try:
        with tqdm(total=n_train + n_val, desc=f"generating {folder}", unit="scene") as bar:
            for split, n in (("train", n_train), ("val", n_val)):
                _write_split(tmp, split, n, seed, fashion_dir, bar)
        with open(os.path.join(tmp, META), "w") as fh:
            json.dump(params, fh)
        try:
            os.rename(tmp, folder)  # atomic; replaces only an empty folder
        except OSError:
            if not _complete(folder, params):  # lost a race: the winner's tree must be complete
                raise
            return False
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return True


def build_fashion_scenes(cfg, folder: str, split: str, augment: bool) -> SegmentationList:
    """Generate the tree on first use, then read it like Cityscapes (DATASET.ROOT / TRAIN_SET / TEST_SET)."""
    if str(cfg.DATASET.LABEL_MAPPING).lower() != "none" or int(cfg.DATASET.NUM_CLASSES) != NUM_CLASSES:
        raise ConfigError(f"fashion_scenes labels are class ids 0..{NUM_CLASSES - 1}: set DATASET.LABEL_MAPPING "
                          f"none and DATASET.NUM_CLASSES {NUM_CLASSES} (got {cfg.DATASET.LABEL_MAPPING!r} and "
                          f"{cfg.DATASET.NUM_CLASSES})")
    generate_fashion_scenes(folder, N_TRAIN, N_VAL, SEED)
    return build_segmentation(cfg, folder, split, augment)
