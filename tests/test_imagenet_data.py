"""ImageNet-style data on real JPEG and recordIO files: torchvision and DALI (CPU) loaders, make_recordio."""
import math
import struct
import subprocess
import sys
from collections import Counter

import pytest
import torch

from conftest import IMAGENET_TINY_OVERRIDES, REPO, needs_debian_fashion, write_jpeg_tree
from deqlab.config import load_config
from deqlab.data import build_loader
from deqlab.data.dali import shard_range
from deqlab.data.recordio import IMAGE_HEADER, RecordIODataset, open_recordio
from deqlab.data.vision import IMAGENET_STD
from deqlab.errors import ConfigError, DatasetError

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI not installed: pip install -e '.[dali]' (scripts/test.sh does)")
from nvidia.dali import fn  # noqa: E402
from nvidia.dali.pipeline import Pipeline  # noqa: E402

sys.path.insert(0, str(REPO / "tools"))
from make_recordio import make_recordio  # noqa: E402

pytestmark = [needs_debian_fashion, pytest.mark.timeout(300), pytest.mark.xdist_group("imagenet_data")]
CFG = REPO / "experiments/imagenet/cls_mdeq_SMALL.yaml"
ONE_GREY_LEVEL = 1 / 255 / min(IMAGENET_STD)  # the largest normalised difference of a ±1 pixel


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_jpeg_tree(tmp_path_factory.mktemp("imagenet"))


def config(root, *overrides):
    return load_config(CFG, IMAGENET_TINY_OVERRIDES + ["DATASET.ROOT", str(root), "WORKERS", "0",
                                                       "TRAIN.BATCH_SIZE_PER_GPU", "8", "TEST.BATCH_SIZE_PER_GPU", "8",
                                                       *overrides])


def everything(loader):
    batches = list(loader)
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]), batches


def test_dali_val_equals_torchvision(tree):
    x_tv, y_tv, _ = everything(build_loader(config(tree), "test"))
    x_dali, y_dali, batches = everything(build_loader(config(tree, "DATASET.LOADER", "dali", "WORKERS", "2"), "test"))
    assert x_dali.shape == x_tv.shape == (29, 3, 32, 32) and [len(y) for _, y in batches] == [8, 8, 8, 5]
    assert x_dali.dtype == x_tv.dtype == torch.float32 and y_dali.dtype == y_tv.dtype == torch.int64
    assert torch.equal(y_dali, y_tv)
    diff = (x_dali - x_tv).abs()
    assert diff.max() <= ONE_GREY_LEVEL + 1e-5 and diff.mean() < 0.2 * ONE_GREY_LEVEL
    # normalised alike: the same per-channel statistics, far from raw [0, 1] pixels
    assert torch.allclose(x_dali.mean((0, 2, 3)), x_tv.mean((0, 2, 3)), atol=1e-3) and x_tv.min() < -1


def test_dali_train_epoch(tree):
    loader = build_loader(config(tree, "DATASET.LOADER", "dali"), "train")
    x, y, batches = everything(loader)
    assert len(loader) == len(batches) == 5 and x.shape == (40, 3, 32, 32) and y.dtype == torch.int64
    reference = build_loader(config(tree), "train").dataset
    assert Counter(y.tolist()) == Counter(label for _, label in reference.samples)  # every image once
    x2, _, _ = everything(loader)
    assert not torch.allclose(x, x2)  # random crops and flips differ from epoch to epoch


def test_dali_val_shards_exactly(tree):
    cfg = config(tree, "DATASET.LOADER", "dali")
    _, y_all, _ = everything(build_loader(cfg, "test"))
    shards = [everything(build_loader(cfg, "test", distributed=True, world_size=2, rank=r)) for r in range(2)]
    assert [len(s[1]) for s in shards] == [14, 15] == [hi - lo for lo, hi in (shard_range(29, r, 2) for r in range(2))]
    assert torch.equal(torch.cat([s[1] for s in shards]), y_all)
    cfg.defrost()
    cfg.TRAIN.BATCH_SIZE_PER_GPU = 4
    lengths = [len(build_loader(cfg, "train", distributed=True, world_size=3, rank=r)) for r in range(3)]
    assert lengths == [math.ceil(math.ceil(40 / 3) / 4)] * 3  # DDP ranks step in lockstep


def test_unfinished_eval_epoch_is_drained(tree):
    loader = build_loader(config(tree, "DATASET.LOADER", "dali"), "test")
    first = next(iter(loader))  # an evaluation that stops after one batch
    _, y, _ = everything(loader)
    assert len(y) == 29 and torch.equal(next(iter(loader))[1], first[1])


def test_make_recordio_round_trip(tree, tmp_path):
    prefix = tmp_path / "val"
    assert make_recordio(tree / "val", prefix, progress=False) == 29
    files = open_recordio(f"{prefix}.rec")
    reference = build_loader(config(tree), "test").dataset.samples
    pipe = Pipeline(batch_size=29, num_threads=1, device_id=None)
    with pipe:
        pipe.set_outputs(*fn.readers.mxnet(path=[f"{prefix}.rec"], index_path=[f"{prefix}.idx"]))
    pipe.build()
    data, labels = pipe.run()
    for i, (path, label) in enumerate(reference):  # the JPEG bytes are stored unchanged, labels as floats
        assert bytes(data.at(i).tobytes()) == open(path, "rb").read() and float(labels.at(i)[0]) == label
    assert len(files.offsets) == 29 and (tmp_path / "val.lst").read_text().count("\n") == 29
    assert (tmp_path / "val.classes.txt").read_text().splitlines()[3] == "3\tclass_3"
    image, label = RecordIODataset(f"{prefix}.rec")[5]
    assert label == reference[5][1] and image.size == __import__("PIL.Image").Image.open(reference[5][0]).size


def test_make_recordio_resize_and_refusals(tree, tmp_path):
    make_recordio(tree / "val", tmp_path / "small", resize=20, quality=80, progress=False)
    image, _ = RecordIODataset(tmp_path / "small.rec")[0]
    assert min(image.size) == 20
    before = (tmp_path / "small.rec").read_bytes()
    with pytest.raises(DatasetError, match="--force"):
        make_recordio(tree / "val", tmp_path / "small", progress=False)
    assert (tmp_path / "small.rec").read_bytes() == before
    proc = subprocess.run([sys.executable, "tools/make_recordio.py", "--src", str(tmp_path / "nowhere"), "--out",
                           str(tmp_path / "x")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "nowhere" in proc.stderr


@pytest.mark.parametrize("loader", ["torchvision", "dali"])
def test_recordio_reads_like_folders(tree, tmp_path, loader):
    root = tmp_path / "data"
    for split in ("train", "val"):
        make_recordio(tree / split, root / split, progress=False)
    x_rec, y_rec, _ = everything(build_loader(config(root, "DATASET.DATA_FORMAT", "rec", "DATASET.LOADER", loader),
                                              "test"))
    x_jpg, y_jpg, _ = everything(build_loader(config(tree, "DATASET.LOADER", loader), "test"))
    assert torch.equal(y_rec, y_jpg) and torch.equal(x_rec, x_jpg)  # the same bytes decode the same


def test_recordio_header_layout():
    # IfQQ without padding: 24 bytes, as MXNet's IRHeader and DALI's reader expect
    assert IMAGE_HEADER.size == 24 and struct.calcsize("<II") == 8


def test_bad_layouts_and_options(tree, tmp_path):
    (tmp_path / "flat").mkdir()
    with pytest.raises(DatasetError, match=r"no test folder .*flat"):
        build_loader(config(tmp_path / "flat"), "test")
    (tmp_path / "empty" / "val" / "class_a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="class folders with images"):
        build_loader(config(tmp_path / "empty", "DATASET.LOADER", "dali"), "test")
    with pytest.raises(ConfigError, match="DATASET.LOADER dali .*imagenet"):
        build_loader(load_config(REPO / "experiments/cifar/cls_mdeq_TINY.yaml", ["DATASET.LOADER", "dali"]), "test")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="DALI_DEVICE gpu needs CUDA"):
            build_loader(config(tree, "DATASET.LOADER", "dali", "DATASET.DALI_DEVICE", "gpu"), "test")


def test_damaged_recordio(tree, tmp_path):
    make_recordio(tree / "val", tmp_path / "val", progress=False)
    rec = tmp_path / "val.rec"
    data = rec.read_bytes()
    rec.write_bytes(data[: len(data) - 100])
    with pytest.raises(DatasetError, match="truncated"):
        open_recordio(rec)
    (tmp_path / "val.idx").unlink()
    with pytest.raises(DatasetError, match=r"has no index .*val\.idx"):
        open_recordio(rec)
