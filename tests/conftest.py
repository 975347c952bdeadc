"""Shared fixtures: a tiny Fashion-MNIST in its real on-disk (IDX) format and a tiny MDEQ config for it."""
import importlib
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# Fixtures produced by the original MDEQ code, kept beside the project (never copied into it).
COMPAT = Path(os.environ.get("DEQLAB_COMPAT_DIR", REPO.parent / "shared" / "compat"))
# Outside CI a checkout without them skips the tests that need them; under CI=true those tests run and fail.
needs_compat = pytest.mark.skipif(not COMPAT.is_dir() and os.environ.get("CI") != "true",
                                  reason=f"compat fixtures not found at {COMPAT} (set DEQLAB_COMPAT_DIR)")
# The MDEQ's two memory layouts (MODEL.CHANNELS_LAST; "auto" picks NHWC on the CPU): the fixtures hold in both.
LAYOUTS = {"nchw": ["MODEL.CHANNELS_LAST", "False"], "nhwc": ["MODEL.CHANNELS_LAST", "True"]}


def import_tool(name: str):
    """The module ``name`` of ``tools/`` (a script, or ``corpora.austen``), imported as the tools import each
    other: with their folder first on ``sys.path``."""
    sys.path.insert(0, str(REPO / "tools"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "tools"))


def write_fashion_mnist(root: Path, n_train: int = 48, n_test: int = 16, seed: int = 0) -> Path:
    """IDX files under ``root/fashion_mnist/FashionMNIST/raw`` (torchvision's layout); class k is a bright
    bar in row band k plus noise, so a model can learn it."""
    raw = root / "fashion_mnist" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
        for img, lab in zip(images, labels):
            img[2 + 2 * lab: 4 + 2 * lab, 4:24] = 255
        for kind, magic, arr in (("images-idx3", 0x803, images), ("labels-idx1", 0x801, labels)):
            header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape)
            (raw / f"{prefix}-{kind}-ubyte").write_bytes(header + arr.tobytes())
    return root


@pytest.fixture
def one_thread_per_process(monkeypatch):
    """Processes started from the test (mp.spawn, torchrun) use one OpenMP thread each: two processes of two
    spinning threads on two cores slow each other down by 10-50x (torchrun does the same by default)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


TINY_OVERRIDES = [
    "MODEL.IMAGE_SIZE", "[28, 28]", "MODEL.DOWNSAMPLE_TIMES", "1", "MODEL.EXPANSION_FACTOR", "2",
    "MODEL.NUM_GROUPS", "2", "MODEL.NUM_LAYERS", "3",
    "MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS", "[4, 8]", "MODEL.EXTRA.FULL_STAGE.HEAD_CHANNELS", "[2, 4]",
    "MODEL.EXTRA.FULL_STAGE.FINAL_CHANSIZE", "16",
    "DEQ.F_SOLVER", "anderson", "DEQ.B_SOLVER", "anderson", "DEQ.F_THRES", "6", "DEQ.B_THRES", "6",
    "DEQ.GRAD", "ift", "TRAIN.PRETRAIN_STEPS", "2", "TRAIN.END_EPOCH", "2", "TRAIN.BATCH_SIZE_PER_GPU", "16",
    "TEST.BATCH_SIZE_PER_GPU", "8", "WORKERS", "0", "PRINT_FREQ", "1", "DEVICE", "cpu",
]


@pytest.fixture
def tiny_run(tmp_path):
    """(config path, overrides, tmp_path) for a seconds-long training run on a tiny Fashion-MNIST."""
    write_fashion_mnist(tmp_path / "data")
    return REPO / "experiments/fashion_mnist/cls_mdeq_quickstart.yaml", in_tmp(TINY_OVERRIDES, tmp_path), tmp_path


def in_tmp(overrides: list[str], tmp_path: Path) -> list[str]:
    """``overrides`` plus data under ``tmp_path/data`` and every output under ``tmp_path``."""
    return overrides + ["DATASET.ROOT", str(tmp_path / "data"), "OUTPUT_DIR", str(tmp_path / "out"),
                        "LOG_DIR", str(tmp_path / "log")]


DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
# The real Fashion-MNIST from Debian's dataset-fashion-mnist (scripts/test.sh installs it; CI must have it).
needs_debian_fashion = pytest.mark.skipif(
    not (DEBIAN_FASHION / "t10k-images-idx3-ubyte.gz").is_file() and os.environ.get("CI") != "true",
    reason=f"Debian package dataset-fashion-mnist not installed ({DEBIAN_FASHION})")
IMAGENET_TINY_OVERRIDES = [
    "MODEL.NUM_CLASSES", "10", "MODEL.IMAGE_SIZE", "[32, 32]", "MODEL.DOWNSAMPLE_TIMES", "1",
    "MODEL.EXPANSION_FACTOR", "2", "MODEL.NUM_GROUPS", "2", "MODEL.NUM_LAYERS", "3",
    "MODEL.EXTRA.FULL_STAGE.NUM_BRANCHES", "2", "MODEL.EXTRA.FULL_STAGE.NUM_BLOCKS", "[1, 1]",
    "MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS", "[4, 8]", "MODEL.EXTRA.FULL_STAGE.HEAD_CHANNELS", "[2, 4]",
    "MODEL.EXTRA.FULL_STAGE.FINAL_CHANSIZE", "16", "DEQ.F_THRES", "6", "DEQ.B_THRES", "6",
    "TRAIN.PRETRAIN_STEPS", "2", "TRAIN.PRECISE_BN_BATCHES", "2", "DEVICE", "cpu", "PRINT_FREQ", "1",
]


def write_jpeg_tree(root: Path, n_train: int = 40, n_val: int = 29, seed: int = 0) -> Path:
    """An ImageNet-layout tree ``root/{train,val}/class_<k>/<i>.JPEG`` of real Fashion-MNIST test images
    (RGB JPEGs, each resized to a random 40-80 x 40-80 so resizing and cropping matter). Returns ``root``."""
    import gzip

    from PIL import Image

    with gzip.open(DEBIAN_FASHION / "t10k-images-idx3-ubyte.gz") as fh:
        images = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(DEBIAN_FASHION / "t10k-labels-idx1-ubyte.gz") as fh:
        labels = np.frombuffer(fh.read(), np.uint8, offset=8)
    rng = np.random.default_rng(seed)
    start = 0
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(start, start + n):
            folder = root / split / f"class_{labels[i]}"
            folder.mkdir(parents=True, exist_ok=True)
            size = (int(rng.integers(40, 81)), int(rng.integers(40, 81)))
            Image.fromarray(images[i]).convert("RGB").resize(size, Image.BILINEAR).save(
                folder / f"{i:05d}.JPEG", quality=90)
        start += n
    return root


def write_seg_tree(root: Path, n_train: int = 8, n_val: int = 4, seed: int = 0) -> Path:
    """A tiny learnable Cityscapes tree in the real layout (``root/cityscapes/{leftImg8bit,gtFine}/...``,
    ``root/list/cityscapes/{train,val}.lst``): 32x64 frames of road (id 7) below sky (id 23) with a car
    (id 26) box and an unlabelled (id 0 -> ignore) stripe; the colours say which is which, plus noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = {7: (128, 64, 128), 23: (70, 130, 180), 26: (0, 0, 142), 0: (0, 0, 0)}
    (root / "list" / "cityscapes").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        lines = []
        for i in range(n):
            ids = np.full((32, 64), 23, dtype=np.uint8)
            ids[int(rng.integers(12, 20)):] = 7
            top, left = int(rng.integers(4, 20)), int(rng.integers(0, 44))
            ids[top:top + 10, left:left + 18] = 26
            ids[:, :2] = 0
            image = np.array([colours[v] for v in ids.ravel()], dtype=np.int16).reshape(32, 64, 3)
            image = np.clip(image + rng.integers(-30, 30, size=image.shape), 0, 255).astype(np.uint8)
            stem = f"{split}/city/city_{i:06d}_000019"
            img, lab = f"leftImg8bit/{stem}_leftImg8bit.png", f"gtFine/{stem}_gtFine_labelIds.png"
            for rel, array in ((img, image), (lab, ids)):
                (root / "cityscapes" / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(root / "cityscapes" / rel)
            lines.append(f"{img} {lab}\n")
        (root / "list" / "cityscapes" / f"{split}.lst").write_text("".join(lines))
    return root


SEG_TINY_OVERRIDES = [
    "MODEL.DOWNSAMPLE_TIMES", "2", "MODEL.EXPANSION_FACTOR", "2", "MODEL.NUM_GROUPS", "2", "MODEL.NUM_LAYERS", "3",
    "MODEL.DROPOUT", "0.0", "MODEL.EXTRA.FULL_STAGE.NUM_BRANCHES", "2", "MODEL.EXTRA.FULL_STAGE.NUM_BLOCKS", "[1, 1]",
    "MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS", "[4, 8]", "MODEL.EXTRA.FULL_STAGE.BIG_KERNELS", "[0, 0]",
    "DEQ.F_SOLVER", "anderson", "DEQ.B_SOLVER", "anderson", "DEQ.F_THRES", "6", "DEQ.B_THRES", "6",
    "TRAIN.PRETRAIN_STEPS", "2", "TRAIN.END_EPOCH", "2", "TRAIN.BATCH_SIZE_PER_GPU", "4", "TRAIN.IMAGE_SIZE", "[64, 32]",
    "TRAIN.BASE_SIZE", "64", "TRAIN.MULTI_SCALE", "False", "TRAIN.FLIP", "True", "TRAIN.OPTIMIZER", "adam",
    "TRAIN.LR", "0.003", "TEST.BATCH_SIZE_PER_GPU", "2", "TEST.IMAGE_SIZE", "[32, 32]", "TEST.BASE_SIZE", "64",
    "WORKERS", "0", "PRINT_FREQ", "1", "DEVICE", "cpu", "TRAIN.PRECISE_BN", "False",
]


@pytest.fixture
def tiny_seg_run(tmp_path):
    """(config path, overrides, tmp_path) for a seconds-long segmentation run on a tiny Cityscapes tree."""
    write_seg_tree(tmp_path / "data")
    return REPO / "experiments/cityscapes/seg_mdeq_SMALL.yaml", in_tmp(SEG_TINY_OVERRIDES, tmp_path), tmp_path


def ddp_reference(cfg, task_name: str = "cls"):
    """What a 2-process DDP run of ``cfg`` must end with, computed in one process: each global batch is the
    two ranks' shards; without SyncBatchNorm (none on CPU) each shard is normalised with its own batch
    statistics, so the per-shard gradients are averaged. Returns (trained model, initial state_dict)."""
    import torch

    from deqlab.data import build_loader
    from deqlab.engine.optim import build_optimizer, build_scheduler
    from deqlab.tasks import get_task

    task = get_task(task_name, cfg)
    torch.manual_seed(cfg.SEED)
    model = task.build_model()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    shards = [build_loader(cfg, "train", distributed=True, world_size=2, rank=r) for r in range(2)]
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, len(shards[0]))
    model.train()
    for step, batches in enumerate(zip(*shards)):
        optimizer.zero_grad()
        for x, y in batches:
            output, _ = model(x, train_step=step)
            (task.loss(output, y) / 2).backward()
        optimizer.step()
        scheduler.step()
    return model, init
