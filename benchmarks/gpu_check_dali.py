"""``gpu_check.py``'s DALI checks: the GPU (``mixed``) decoder against the CPU decoder on the same JPEG and
recordIO files, and recordIO against the JPEGs it was packed from, on the tiny ImageNet-layout tree the tests
build (``tests/conftest.py``: real Fashion-MNIST images as JPEGs, from Debian's dataset-fashion-mnist)."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from gpu_check_common import compared, row

REPO = Path(__file__).resolve().parents[1]
# nvJPEG's IDCT and libjpeg-turbo's may round a pixel differently, and the antialiased resize spreads that over
# neighbours: at most a couple of grey levels apart, never a shifted or mis-cropped image (tens of levels).
# Unmeasured so far (no GPU yet): the first CUDA run says how close they are.
MIXED_TOL_GREY = 2.0
CHECKS = ("dali/mixed_vs_cpu/jpeg", "dali/mixed_vs_cpu/rec", "dali/cpu/rec_vs_jpeg")


def _loaders(device: torch.device, root: Path):
    """The test split of ``root`` through deqlab's DALI loader: ``decode(where, fmt)`` → (images, labels)."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import IMAGENET_TINY_OVERRIDES  # the tests' tiny ImageNet model config

    from deqlab.config import load_config
    from deqlab.data import build_loader

    def decode(where: str, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = load_config(REPO / "experiments/imagenet/cls_mdeq_SMALL.yaml",
                          [*IMAGENET_TINY_OVERRIDES, "DATASET.ROOT", str(root / fmt), "DATASET.DATA_FORMAT", fmt,
                           "DATASET.LOADER", "dali", "DATASET.DALI_DEVICE", where, "DEVICE", device.type,
                           "WORKERS", "2", "TEST.BATCH_SIZE_PER_GPU", "8"])
        batches = list(build_loader(cfg, "test"))
        return torch.cat([x.cpu() for x, _ in batches]), torch.cat([y.cpu() for _, y in batches])
    return decode


def grey_levels(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference of two normalised image batches, in 8-bit grey levels."""
    from deqlab.data.vision import IMAGENET_STD

    return ((a - b).abs().amax((0, 2, 3)) * 255 * torch.tensor(IMAGENET_STD)).max().item()


def dali_checks(device: torch.device) -> list[dict]:
    """mixed vs cpu decoding on JPEG and recordIO (CUDA), recordIO vs JPEG through the CPU decoder (anywhere)."""
    from deqlab.data.dali import dali_available

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import DEBIAN_FASHION, write_jpeg_tree

    missing = ("NVIDIA DALI not installed (pip install -e '.[dali]')" if not dali_available() else
               "" if (DEBIAN_FASHION / "t10k-images-idx3-ubyte.gz").is_file() else
               f"the JPEG tree is built from Debian's dataset-fashion-mnist, not installed ({DEBIAN_FASHION})")
    if missing:
        return [row(name, device.type, "n/a", reason=missing) for name in CHECKS]
    sys.path.insert(0, str(REPO / "tools"))
    from make_recordio import make_recordio

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_jpeg_tree(root / "jpg")
        for split in ("train", "val"):
            make_recordio(root / "jpg" / split, root / "rec" / split, progress=False)
        decode = _loaders(device, root)
        cpu = {fmt: decode("cpu", fmt) for fmt in ("jpg", "rec")}
        for fmt, name in (("jpg", CHECKS[0]), ("rec", CHECKS[1])):
            if device.type != "cuda":
                rows.append(row(name, device.type, "n/a", reason="the mixed (nvJPEG) decoder needs CUDA"))
                continue
            x, y = decode("gpu", fmt)
            if not torch.equal(y, cpu[fmt][1]) or x.shape != cpu[fmt][0].shape:
                rows.append(row(name, "cuda", "fail", reason="labels or shapes differ from the CPU decoder's"))
            else:
                rows.append(compared(name, "cuda", grey_levels(x, cpu[fmt][0]), MIXED_TOL_GREY,
                                     f"max difference in grey levels over {len(y)} images"))
        (x_rec, y_rec), (x_jpg, y_jpg) = cpu["rec"], cpu["jpg"]
        same = torch.equal(y_rec, y_jpg) and x_rec.shape == x_jpg.shape
        rows.append(compared(CHECKS[2], "cpu", grey_levels(x_rec, x_jpg) if same else float("inf"), 0.0,
                             f"the same JPEG bytes decode identically ({len(y_jpg)} images)"))
    return rows
