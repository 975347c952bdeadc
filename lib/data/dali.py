"""NVIDIA DALI loaders for ImageNet-style data (``DATASET.LOADER dali``): JPEG decoding off the Python workers.

The pipelines reproduce ``deqlab.data.imagenet``'s torchvision transforms:

- train: ``decoders.image_random_crop`` (area 0.08-1, aspect 3/4-4/3; decoding only the crop) → resize to
  (H, W) → random horizontal flip → normalise to CHW float;
- eval: decode → resize the shorter side to ``H / 0.875`` with torchvision's sizes (the long side truncated,
  not rounded) → centre crop at torchvision's offsets (round half to even) → normalise. The result equals
  torchvision's to ±1 grey level (the two antialiased bilinear resamplers round differently).

Readers: ``readers.file`` over the scanned class-folder list (the torchvision loader's samples and labels), or
``readers.mxnet`` over ``.rec``/``.idx``. Decoding runs on the GPU (``device="mixed"``) with
``DATASET.DALI_DEVICE gpu`` (``auto`` when CUDA is available), on the CPU otherwise; a CPU pipeline has
``device_id=None`` and needs no GPU at all.

Sharding: rank r of N reads DALI's shard r, samples [r·M/N, (r+1)·M/N) of M. The eval loader pads the last
batch inside DALI and drops the padding here, so every sample is counted exactly once over the ranks. The
train loader yields the same number of batches, ceil(ceil(M/N)/B), on every rank (DDP steps in lockstep);
its reader streams across epoch boundaries, like a sampler that never drops a sample.
"""
from __future__ import annotations

import importlib.util
import itertools
import math
import re
from typing import Any, Iterator

import torch

from deqlab.data.imagenet import CROP_FRACTION, RRC_AREA, RRC_RATIO, ImageSource, image_source
from deqlab.data.images import first_undecodable
from deqlab.data.recordio import REBUILD, first_bad_record, open_recordio, record_images
from deqlab.data.vision import IMAGENET_MEAN, IMAGENET_STD, image_hw, normalisation
from deqlab.errors import ConfigError, DatasetError

INSTALL_HINT = ("pip install -e '.[dali]' (the CUDA 13 build, nvidia-dali-cuda130; nvidia-dali-cuda120 for "
                "CUDA 12), or set DATASET.LOADER torchvision")
READER = "reader"
# DALI's pipeline errors: a header, the Python traceback of the operator, then what it "encountered".
_DALI_NOISE = ("Critical error in pipeline", "Current pipeline object is no longer valid", "C++ context")
_DECODE_FAILURE = re.compile(r"Failed to decode sample #\d+ : (.+?)(?: at index (\d+))?$")


def dali_available() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no `nvidia` namespace package at all
        return False


def dali_device(cfg) -> str:
    """``cpu`` or ``gpu``: where the pipeline decodes, from ``DATASET.DALI_DEVICE`` and the run's device."""
    wanted = str(cfg.DATASET.DALI_DEVICE)
    cuda = torch.cuda.is_available() and str(cfg.DEVICE) != "cpu"
    if wanted == "gpu" and not cuda:
        raise ConfigError("DATASET.DALI_DEVICE gpu needs CUDA (and DEVICE auto or cuda); use cpu or auto")
    return "gpu" if wanted == "gpu" or (wanted == "auto" and cuda) else "cpu"


def shard_range(size: int, shard: int, num_shards: int) -> tuple[int, int]:
    """The samples DALI's reader gives shard ``shard`` of ``num_shards``."""
    return size * shard // num_shards, size * (shard + 1) // num_shards


def _round_half_even(d):
    """torchvision's centre-crop offset, ``int(round(d / 2))``, in DALI integer arithmetic."""
    k = d // 2
    return k + ((d & 1) & (k & 1))


def _pipeline(cfg, source: ImageSource, train: bool, batch_size: int, shard: int, num_shards: int,
              device: str, device_id: int | None, seed: int):
    """``train``: shuffled, streaming, augmented; else in order, padded last batch, eval transform."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath
    from nvidia.dali.pipeline import Pipeline

    h, w = image_hw(cfg)
    pipe = Pipeline(batch_size=batch_size, num_threads=max(1, int(cfg.WORKERS)), device_id=device_id, seed=seed)
    with pipe:
        reader = dict(shard_id=shard, num_shards=num_shards, random_shuffle=train, pad_last_batch=not train,
                      name=READER)
        if source.format == "rec":
            jpegs, labels = fn.readers.mxnet(path=[str(source.rec)], index_path=[str(source.rec.with_suffix(".idx"))],
                                             **reader)
        else:
            jpegs, labels = fn.readers.file(files=source.files, labels=source.labels, **reader)
        decoder = "mixed" if device == "gpu" else "cpu"
        if train:
            images = fn.decoders.image_random_crop(jpegs, device=decoder, output_type=types.RGB,
                                                   random_area=list(RRC_AREA), random_aspect_ratio=list(RRC_RATIO),
                                                   num_attempts=10)
            images = fn.resize(images, resize_x=w, resize_y=h, interp_type=types.INTERP_LINEAR, antialias=True)
            mirror = fn.random.coin_flip(probability=0.5)
        else:
            shape = fn.peek_image_shape(jpegs, dtype=types.INT64)  # (H, W, C) from the JPEG header
            src_h, src_w = shape[0], shape[1]
            side = int(max(h, w) / CROP_FRACTION)
            short = dmath.min(src_h, src_w)
            new_h, new_w = side * src_h // short, side * src_w // short
            images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB)
            images = fn.resize(images, resize_x=fn.cast(new_w, dtype=types.FLOAT),
                               resize_y=fn.cast(new_h, dtype=types.FLOAT), interp_type=types.INTERP_LINEAR,
                               antialias=True)
            anchor = fn.stack(_round_half_even(new_h - h), _round_half_even(new_w - w))
            crop = fn.cast(fn.stack(new_h * 0 + h, new_w * 0 + w), dtype=types.INT64)
            images = fn.slice(images, anchor, crop, axis_names="HW", normalized_anchor=False, normalized_shape=False)
            mirror = 0
        mean, std = normalisation(cfg, IMAGENET_MEAN, IMAGENET_STD)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mirror=mirror,
                                          mean=[255 * m for m in mean], std=[255 * s for s in std])
        labels = fn.cast(labels, dtype=types.INT64)  # int32 from readers.file, float32 from readers.mxnet
        if device == "gpu":
            labels = labels.gpu()
        pipe.set_outputs(images, labels)
    pipe.build()
    return pipe


def _to_torch(batch, device: torch.device) -> torch.Tensor:
    """Copy a DALI TensorList (CPU or GPU) into a new torch tensor on ``device``."""
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    tensor = batch.as_tensor()
    out = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    feed_ndarray(tensor, out, cuda_stream=stream)
    return out


def dali_error(err: RuntimeError, source: ImageSource, start: int = 0, threads: int = 4) -> DatasetError:
    """DALI's multi-line pipeline failure as one line naming the file or record that failed.

    DALI names the file for most decoding failures; when it does not (``nvImageCodec failure``, a reader's bad
    magic number), the record headers, then the images from sample ``start`` on (where the failing batch began,
    wrapping around), are checked with PIL on ``threads`` threads until the first bad one."""
    _, found, tail = str(err).partition("encountered:")
    lines = [line.strip() for line in (tail if found else str(err)).splitlines()]
    reason = " ".join(line for line in lines if line and not line.startswith(_DALI_NOISE))
    decode = _DECODE_FAILURE.search(reason)
    if decode and decode.group(2) is not None and source.format == "rec":  # DALI's "index" is the byte offset
        files, offset = open_recordio(source.rec), int(decode.group(2))
        where = files.record(files.offsets.index(offset)) if offset in files.offsets else f"{source.rec} byte {offset}"
        return DatasetError(f"{where}: DALI cannot decode the image; {REBUILD}")
    if decode:
        return DatasetError(f"{decode.group(1)}: DALI cannot decode the image; replace or remove the file")
    if source.format == "rec":
        files = open_recordio(source.rec)
        bad = first_bad_record(files)
        if bad:
            return DatasetError(f"{bad}; {REBUILD}")
        n = len(files.offsets)
        bad = first_undecodable(record_images(files, _rotated(n, start)), threads, hint=REBUILD)
    else:
        bad = first_undecodable(((source.files[k], source.files[k]) for k in _rotated(len(source.files), start)),
                                threads)
    return DatasetError(bad or f"DALI cannot read {source.path}: {reason}")


def _rotated(n: int, start: int) -> Iterator[int]:
    """0..n-1 starting at ``start``."""
    start = start % n if n else 0
    return itertools.chain(range(start, n), range(start))


class DaliLoader:
    """``(images, labels)`` batches from a DALI pipeline, ``len(loader)`` of them per epoch (see the module
    docstring for the sharding). An eval epoch left unfinished is drained before the next one starts."""

    def __init__(self, pipe: Any, shard_size: int, batch_size: int, num_batches: int, exact: bool,
                 device: torch.device, source: ImageSource, shard_start: int = 0) -> None:
        self.pipe, self.shard_size, self.batch_size, self.source = pipe, shard_size, batch_size, source
        self.shard_start = shard_start  # the first sample of this rank's shard, in the reader's order
        self.num_batches, self.exact, self.device = num_batches, exact, device
        self._position = 0  # batches of the current eval epoch already run

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.exact:
            for k in range(self._position and self.num_batches - self._position):
                self._run(self._position + k)
            self._position = 0
        for i in range(self.num_batches):
            images, labels = self._run(i)
            x, y = _to_torch(images, self.device), _to_torch(labels, self.device).view(-1)
            if self.exact:
                self._position = (i + 1) % self.num_batches
                keep = self.shard_size - i * self.batch_size
                x, y = x[:keep], y[:keep]
            yield x, y

    def _run(self, batch: int):
        try:
            return self.pipe.run()
        except RuntimeError as err:  # a shuffled (train) reader's order is unknown: the search starts at its shard
            start = self.shard_start + (batch * self.batch_size if self.exact else 0)
            raise dali_error(err, self.source, start, getattr(self.pipe, "num_threads", 4)) from None


def build_dali_loader(cfg, folder: str, split: str, augment: bool, world_size: int = 1, rank: int = 0) -> DaliLoader:
    """The DALI loader of ``split`` for this rank (``DATASET.LOADER dali``)."""
    if str(cfg.DATASET.DATASET).lower() != "imagenet":
        raise ConfigError(f"DATASET.LOADER dali reads ImageNet-style data (DATASET.DATASET imagenet), "
                          f"got DATASET.DATASET {cfg.DATASET.DATASET}; use DATASET.LOADER torchvision")
    if not dali_available():
        raise DatasetError(f"DATASET.LOADER dali: NVIDIA DALI is not installed; install it with {INSTALL_HINT}")
    device = dali_device(cfg)
    source = image_source(cfg, folder, split)
    batch = int(cfg.TRAIN.BATCH_SIZE_PER_GPU if split == "train" else cfg.TEST.BATCH_SIZE_PER_GPU)
    train = split == "train" and augment  # the un-augmented train split is evaluated: exact, in order
    torch_device = torch.device("cpu")
    device_id = None
    if device == "gpu":
        device_id = torch.cuda.current_device()
        torch_device = torch.device("cuda", device_id)
    pipe = _pipeline(cfg, source, train, batch, rank, world_size, device, device_id, seed=int(cfg.SEED) + rank)
    size = pipe.reader_meta(READER)["epoch_size"]
    lo, hi = shard_range(size, rank, world_size)
    # train: the largest shard, so that every rank runs as many steps
    shard_size = math.ceil(size / world_size) if train else hi - lo
    if shard_size == 0:
        raise DatasetError(f"imagenet: {source.path} has {size} {split} images, fewer than the {world_size} ranks")
    return DaliLoader(pipe, shard_size, batch, math.ceil(shard_size / batch), exact=not train, device=torch_device,
                      source=source, shard_start=lo)


__all__ = ["DaliLoader", "build_dali_loader", "dali_available", "dali_device", "shard_range", "INSTALL_HINT"]
