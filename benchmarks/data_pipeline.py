"""ImageNet input pipelines: images/s of torchvision (DataLoader workers) and DALI, train and eval transforms.

    python benchmarks/data_pipeline.py [--images 320] [--size 500 375] [--workers 2] [--batch 32] [--epochs 2]
                                       [--data DIR] [--out benchmarks/results/data_pipeline.json]

Builds (unless ``--data`` names an ImageNet-layout folder with ``train/`` and ``val/``) a tree of ``--images``
real JPEGs per split: Fashion-MNIST test images (Debian's dataset-fashion-mnist) upscaled to about ``--size``
(ImageNet's typical 500x375), in 10 class folders, quality 90; plus the same as recordIO (tools/make_recordio.py).
Each pipeline then produces 224x224 normalised CHW float batches exactly as training uses them
(``deqlab.data.build_loader``): ``train`` = random-resized crop + flip, ``val`` = resize 256 + centre crop.
One warm-up epoch, then ``--epochs`` timed epochs; images/s is the median over the timed epochs. DALI runs on
the CPU with ``--workers`` threads (as many as the torchvision workers) and, when CUDA is available, with GPU
("mixed") decoding too. Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def write_tree(root: Path, images: int, size: tuple[int, int]) -> None:
    """``root/{train,val}/class_k/*.JPEG``: real Fashion-MNIST images upscaled to about ``size``."""
    from PIL import Image

    with gzip.open(FASHION) as fh:
        pixels = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    rng = np.random.default_rng(0)
    for s, split in enumerate(("train", "val")):
        for i in range(images):
            folder = root / split / f"class_{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            w, h = (int(d * rng.uniform(0.8, 1.2)) for d in size)
            image = Image.fromarray(pixels[s * images + i]).resize((w, h), Image.BICUBIC).convert("RGB")
            image.save(folder / f"{i:05d}.JPEG", quality=90)


def rate(cfg, split: str, epochs: int) -> tuple[float, int]:
    """(median images/s over ``epochs`` timed epochs after a warm-up one, images per epoch)."""
    from deqlab.data import build_loader

    loader = build_loader(cfg, split)
    rates, count = [], 0
    for epoch in range(epochs + 1):
        start, count = time.perf_counter(), 0
        for x, y in loader:
            count += len(y)
            if x.is_cuda:
                torch.cuda.synchronize()
        if epoch:
            rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=320, help="JPEGs per split (generated tree)")
    parser.add_argument("--size", type=int, nargs=2, default=[500, 375], help="approximate width height")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--data", default="", help="an existing ImageNet-layout folder instead of the generated one")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/data_pipeline.json"))
    args = parser.parse_args()

    from deqlab.config import load_config
    from deqlab.data.dali import dali_available

    sys.path.insert(0, str(REPO / "tools"))
    from make_recordio import make_recordio

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data) if args.data else Path(tmp) / "imagenet"
        if not args.data:
            write_tree(root, args.images, tuple(args.size))
        for split in ("train", "val"):
            make_recordio(root / split, Path(tmp) / "rec" / split, progress=False)
        setups = [("torchvision", "jpg", "cpu"), ("torchvision", "rec", "cpu")]
        if dali_available():
            setups += [("dali", "jpg", "cpu"), ("dali", "rec", "cpu")]
            if torch.cuda.is_available():
                setups += [("dali", "jpg", "gpu"), ("dali", "rec", "gpu")]
        rows = []
        for loader, fmt, device in setups:
            for split in ("train", "test"):
                data = root if fmt == "jpg" else Path(tmp) / "rec"
                cfg = load_config(REPO / "experiments/imagenet/cls_mdeq_SMALL.yaml", [
                    "DATASET.ROOT", str(data), "DATASET.DATA_FORMAT", fmt, "DATASET.LOADER", loader,
                    "DATASET.DALI_DEVICE", device, "WORKERS", str(args.workers),
                    "TRAIN.BATCH_SIZE_PER_GPU", str(args.batch), "TEST.BATCH_SIZE_PER_GPU", str(args.batch),
                    "DEVICE", "cuda" if device == "gpu" else "auto"])
                images_s, count = rate(cfg, split, args.epochs)
                split_name = "val" if split == "test" else split
                rows.append({"loader": loader, "format": fmt, "decode": device, "split": split_name,
                             "images_per_s": images_s, "images": count, "workers": args.workers,
                             "batch": args.batch})
                print(f"{loader:12s} {fmt:4s} {device:4s} {split_name:6s} "
                      f"{images_s:9.1f} images/s  ({count} images per epoch)", flush=True)
    base = {(r["split"], r["format"]): r["images_per_s"] for r in rows if r["loader"] == "torchvision"}
    print("\nratio to torchvision (same split and format):")
    for r in rows:
        if r["loader"] != "torchvision":
            print(f"  {r['loader']} {r['format']} {r['decode']} {r['split']}: "
                  f"x{r['images_per_s'] / base[(r['split'], r['format'])]:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
