"""deqlab.data on real on-disk formats written into tmp_path (IDX gz, CIFAR pickles, an ImageFolder)."""
import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from deqlab.config.defaults import DEFAULTS
from deqlab.data import build_dataset, build_loader, dataset_dir
from deqlab.data.vision import CIFAR_MEAN, CIFAR_STD, DEBIAN_FASHION_DIR
from deqlab.errors import DatasetError


def make_cfg(root, name, size=(28, 28), **kw):
    cfg = DEFAULTS.clone()
    cfg.defrost()
    cfg.DATASET.DATASET = name
    cfg.DATASET.ROOT = str(root)
    cfg.MODEL.IMAGE_SIZE = list(size)
    cfg.WORKERS = 0
    cfg.TRAIN.BATCH_SIZE_PER_GPU = 4
    cfg.TEST.BATCH_SIZE_PER_GPU = 5
    for key, value in kw.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


@pytest.fixture(autouse=True)
def _no_download(monkeypatch):
    monkeypatch.delenv("DEQLAB_ALLOW_DOWNLOAD", raising=False)


# ---------------------------------------------------------------- Fashion-MNIST
def write_idx_gz(path, magic, array):
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">I", magic))
        for d in array.shape:
            f.write(struct.pack(">I", d))
        f.write(array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_debian(tmp_path, monkeypatch):
    deb = tmp_path / "debian"
    deb.mkdir()
    rng = np.random.default_rng(0)
    data = {}
    for prefix, n in (("train", 20), ("t10k", 10)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
        write_idx_gz(deb / f"{prefix}-images-idx3-ubyte.gz", 0x00000803, images)
        write_idx_gz(deb / f"{prefix}-labels-idx1-ubyte.gz", 0x00000801, labels)
        data[prefix] = (images, labels)
    monkeypatch.setenv("DEQLAB_FASHION_MNIST_DEBIAN", str(deb))
    return data


def test_fashion_mnist_extracts_from_debian_dir(tmp_path, fake_debian):
    cfg = make_cfg(tmp_path / "data", "fashion_mnist", **{"DATASET.AUGMENT": False})
    raw = tmp_path / "data" / "fashion_mnist" / "FashionMNIST" / "raw"
    assert not raw.exists()
    train = build_dataset(cfg, "train")
    test = build_dataset(cfg, "test")
    for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte"):
        assert (raw / f).is_file()
    assert not [p for p in os.listdir(raw) if p.endswith(".tmp")]
    assert len(train) == 20 and len(test) == 10
    x, y = test[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert [test[i][1] for i in range(10)] == fake_debian["t10k"][1].tolist()
    assert [train[i][1] for i in range(20)] == fake_debian["train"][1].tolist()
    # un-normalise and compare the pixels
    pix = (x * 0.3530 + 0.2860) * 255
    assert torch.allclose(pix, torch.from_numpy(fake_debian["t10k"][0][3]).float()[None], atol=0.01)


def test_fashion_mnist_percent_and_resize(tmp_path, fake_debian):
    cfg = make_cfg(tmp_path / "data", "fashion_mnist", **{"PERCENT": 0.5})
    a, b = build_dataset(cfg, "train"), build_dataset(cfg, "train", augment=False)
    assert len(a) == 10 and list(a.indices) == list(b.indices)
    assert len(set(a.indices)) == 10
    assert len(build_dataset(cfg, "test")) == 10  # PERCENT only touches train
    cfg.MODEL.IMAGE_SIZE = [32, 32]
    assert build_dataset(cfg, "test")[0][0].shape == (1, 32, 32)
    assert build_dataset(cfg, "train")[0][0].shape == (1, 32, 32)


def test_fashion_mnist_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("DEQLAB_FASHION_MNIST_DEBIAN", str(tmp_path / "nodeb"))
    cfg = make_cfg(tmp_path / "data", "fashion_mnist")
    with pytest.raises(DatasetError) as err:
        build_dataset(cfg, "test")
    msg = str(err.value)
    assert "\n" not in msg and "fashion_mnist" in msg
    assert str(tmp_path / "nodeb") in msg and str(tmp_path / "data" / "fashion_mnist") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "DEQLAB_ALLOW_DOWNLOAD=1" in msg


@pytest.mark.skipif(not os.path.isfile(os.path.join(DEBIAN_FASHION_DIR, "t10k-images-idx3-ubyte.gz")),
                    reason=f"Debian package dataset-fashion-mnist not installed ({DEBIAN_FASHION_DIR})")
def test_fashion_mnist_real_test_split(tmp_path, monkeypatch):
    monkeypatch.delenv("DEQLAB_FASHION_MNIST_DEBIAN", raising=False)
    cfg = make_cfg(tmp_path, "fashion_mnist")
    raw = tmp_path / "fashion_mnist" / "FashionMNIST" / "raw"
    # nothing pre-extracted: the builder gunzips the Debian files into tmp_path
    test = build_dataset(cfg, "test")
    assert len(test) == 10000 and (raw / "t10k-images-idx3-ubyte").is_file()
    x, y = test[0]
    assert x.shape == (1, 28, 28) and 0 <= y < 10
    assert abs(float(test.data.float().div(255).mean()) - 0.2860) < 0.01


# ---------------------------------------------------------------- CIFAR-10
def write_cifar(folder, n_train=6, n_test=7):
    base = folder / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(1)
    written = {}
    for name, n in [(f"data_batch_{i}", n_train) for i in range(1, 6)] + [("test_batch", n_test)]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        with open(base / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels, "batch_label": name}, f)
        written[name] = (data, labels)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return written


def test_cifar10_roundtrip_and_augment(tmp_path):
    written = write_cifar(tmp_path / "data" / "cifar10")
    cfg = make_cfg(tmp_path / "data", "cifar10", size=(32, 32))
    test = build_dataset(cfg, "test")
    assert len(test) == 7 and test.classes[3] == "class3"
    first = written["test_batch"][0][0].reshape(3, 32, 32)
    assert np.array_equal(test.data[0], first.transpose(1, 2, 0))
    x, y = test[0]
    assert y == written["test_batch"][1][0]
    mean, std = torch.tensor(CIFAR_MEAN)[:, None, None], torch.tensor(CIFAR_STD)[:, None, None]
    assert torch.allclose((x * std + mean) * 255, torch.from_numpy(first).float(), atol=0.01)
    assert torch.equal(test[0][0], test[0][0])  # no augmentation on test

    train = build_dataset(cfg, "train")  # AUGMENT defaults to True
    assert len(train) == 30
    torch.manual_seed(0)
    views = [train[0][0] for _ in range(8)]
    assert any(not torch.equal(views[0], v) for v in views[1:])
    plain = build_dataset(cfg, "train", augment=False)
    assert torch.equal(plain[0][0], plain[0][0])
    assert train[5][1] == plain[5][1] == written["data_batch_1"][1][5]

    loader = build_loader(cfg, "train")
    xb, yb = next(iter(loader))
    assert xb.shape == (4, 3, 32, 32) and yb.shape == (4,)
    assert sum(len(b[1]) for b in build_loader(cfg, "test")) == 7


def test_cifar10_rootdir_is_dataset_dir_and_loader_reproducible(tmp_path):
    write_cifar(tmp_path / "cifar10")
    cfg = make_cfg(tmp_path / "cifar10/", "cifar10", size=(32, 32))  # mdeq style ROOT: data/cifar10/
    assert dataset_dir(cfg) == str(tmp_path / "cifar10")
    order = [torch.cat([y for _, y in build_loader(cfg, "train", augment=False)]) for _ in range(2)]
    assert torch.equal(order[0], order[1])


def test_cifar10_missing(tmp_path):
    cfg = make_cfg(tmp_path / "data", "cifar10", size=(32, 32))
    with pytest.raises(DatasetError) as err:
        build_dataset(cfg, "train")
    msg = str(err.value)
    assert "\n" not in msg and "cifar10" in msg
    assert str(tmp_path / "data" / "cifar10" / "cifar-10-batches-py") in msg and "DEQLAB_ALLOW_DOWNLOAD" in msg


# ---------------------------------------------------------------- ImageNet
def test_imagenet_folder(tmp_path):
    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        for cls, ext in (("n01", "png"), ("n02", "jpg")):
            d = tmp_path / "imagenet" / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                arr = rng.integers(0, 256, size=(40 + 5 * i, 50, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"img{i}.{ext}")
    cfg = make_cfg(tmp_path, "imagenet", size=(24, 24))
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert train.classes == ["n01", "n02"] and len(val.classes) == 2 and len(train) == len(val) == 6
    assert train[0][0].shape == (3, 24, 24) and val[5][0].shape == (3, 24, 24) and val[5][1] == 1
    xb, _ = next(iter(build_loader(cfg, "test")))
    assert xb.shape == (5, 3, 24, 24)

    cfg.DATASET.TEST_SET = "nope"
    with pytest.raises(DatasetError) as err:
        build_dataset(cfg, "test")
    assert str(tmp_path / "imagenet" / "nope") in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- errors and sharding
def test_unknown_dataset_and_bad_percent(tmp_path):
    cfg = make_cfg(tmp_path, "mnist3d")
    with pytest.raises(DatasetError, match="DATASET.DATASET.*mnist3d.*cifar10.*fashion_mnist.*imagenet"):
        build_dataset(cfg, "train")
    for bad in (0.0, -0.1, 1.5):
        cfg = make_cfg(tmp_path, "cifar10", PERCENT=bad)
        with pytest.raises(DatasetError, match="PERCENT"):
            build_dataset(cfg, "train")
    with pytest.raises(DatasetError, match="split"):
        build_dataset(make_cfg(tmp_path, "cifar10"), "val")


def test_distributed_shards_disjoint_and_cover(tmp_path):
    write_cifar(tmp_path / "cifar10", n_train=6)  # 30 train images
    cfg = make_cfg(tmp_path, "cifar10", size=(32, 32))
    shards = []
    for rank in range(3):
        loader = build_loader(cfg, "train", distributed=True, augment=False, world_size=3, rank=rank)
        loader.sampler.set_epoch(1)
        shards.append(list(loader.sampler))
    assert all(len(s) == 10 for s in shards)
    assert sorted(shards[0] + shards[1] + shards[2]) == list(range(30))  # disjoint and covering
    assert shards[0] != list(range(0, 30, 3))  # shuffled
    # uneven: 30 over 4 ranks pads 2 repeats, still covers everything
    shards = [list(build_loader(cfg, "train", distributed=True, world_size=4, rank=r).sampler) for r in range(4)]
    assert sum(map(len, shards)) == 32 and set().union(*shards) == set(range(30))
    cfg.PERCENT = 0.4
    shards = [list(build_loader(cfg, "train", distributed=True, world_size=2, rank=r).sampler) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(12))


def test_test_split_shards_count_every_image_once(tmp_path):
    write_cifar(tmp_path / "cifar10", n_train=2, n_test=7)
    cfg = make_cfg(tmp_path, "cifar10", size=(32, 32))
    shards = [list(build_loader(cfg, "test", distributed=True, world_size=3, rank=r).sampler) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(len(build_dataset(cfg, "test"))))


def test_n_ranks_see_the_samples_of_one_process_with_n_times_the_batch(tmp_path):
    write_cifar(tmp_path / "cifar10", n_train=6)
    cfg = make_cfg(tmp_path, "cifar10", size=(32, 32))
    cfg.TRAIN.BATCH_SIZE_PER_GPU = 8
    single = build_loader(cfg, "train", augment=False)
    single.sampler.set_epoch(2)
    cfg.TRAIN.BATCH_SIZE_PER_GPU = 4
    ranks = [build_loader(cfg, "train", distributed=True, augment=False, world_size=2, rank=r) for r in range(2)]
    for loader in ranks:
        loader.sampler.set_epoch(2)
    for (_, y), (_, y0), (_, y1) in zip(single, *ranks):
        assert sorted(y.tolist()) == sorted(y0.tolist() + y1.tolist())


# what each dataset's builder reads directly inside its folder (a file or a folder of that name)
HELD = {"fashion_mnist": "FashionMNIST", "cifar10": "cifar-10-batches-py", "imagenet": "train",
        "cityscapes": "leftImg8bit", "fashion_scenes": "fashion_scenes.json", "wikitext103": "train.txt",
        "austen": "valid.txt"}


@pytest.mark.parametrize("name", sorted(HELD))
def test_a_root_holding_the_files_is_used_as_is_whatever_its_name(tmp_path, name):
    from deqlab.data import DATASETS
    assert set(HELD) == set(DATASETS)  # every dataset has its case here
    sub = DATASETS[name][1]
    holding, parent = tmp_path / "any name", tmp_path / "parent"
    holding.mkdir()
    if "." in HELD[name]:
        (holding / HELD[name]).write_text("")
    else:
        (holding / HELD[name]).mkdir()
    (parent / sub).mkdir(parents=True)
    assert dataset_dir(make_cfg(holding, name)) == str(holding)
    assert dataset_dir(make_cfg(parent, name)) == str(parent / sub)   # a parent folder: <ROOT>/<name>, as before
    assert dataset_dir(make_cfg(tmp_path / "empty", name)) == str(tmp_path / "empty" / sub)
