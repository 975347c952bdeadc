"""Segmentation data: the Cityscapes-layout reader on tiny real trees, and the generated fashion_scenes set."""
import multiprocessing
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import id2label
from PIL import Image

from deqlab.config.defaults import DEFAULTS
from deqlab.data import build_dataset, build_loader
from deqlab.data import fashion_scenes as fs
from deqlab.data.vision import DEBIAN_FASHION_DIR, IMAGENET_MEAN, IMAGENET_STD
from deqlab.errors import ConfigError, DatasetError

H, W = 24, 48  # tiny "Cityscapes" frames, 1:2 like the real ones
MEAN, STD = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)


@pytest.fixture(autouse=True)
def _no_download(monkeypatch):
    monkeypatch.delenv("DEQLAB_ALLOW_DOWNLOAD", raising=False)


def make_cfg(root, name="cityscapes", **kw):
    cfg = DEFAULTS.clone()
    cfg.defrost()
    cfg.DATASET.DATASET = name
    cfg.DATASET.ROOT = str(root)
    cfg.DATASET.TRAIN_SET = f"list/{name}/train.lst"
    cfg.DATASET.TEST_SET = f"list/{name}/val.lst"
    cfg.WORKERS = 0
    for key, value in kw.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def write_tree(root, splits):
    """``root/cityscapes/{leftImg8bit,gtFine}/<split>/city/...`` and ``root/list/cityscapes/<split>.lst``
    (HRNet's layout); ``splits`` maps a split to (image (H, W, 3), label ids (H, W) or None) pairs."""
    base = root / "cityscapes"
    (root / "list" / "cityscapes").mkdir(parents=True, exist_ok=True)
    for split, pairs in splits.items():
        lines = []
        for i, (image, label) in enumerate(pairs):
            stem = f"{split}/city/city_{i:06d}_000019"
            img = f"leftImg8bit/{stem}_leftImg8bit.png"
            (base / img).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(base / img)
            if label is None:
                lines.append(img)
                continue
            lab = f"gtFine/{stem}_gtFine_labelIds.png"
            (base / lab).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(label.astype(np.uint8)).save(base / lab)
            # instance ids as in the real gtFine (id * 1000 + instance for things), a uint16 PNG
            inst = Image.fromarray((label.astype(np.uint16) * 1000 + 1))
            assert inst.mode == "I;16"
            inst.save(base / f"gtFine/{stem}_gtFine_instanceIds.png")
            lines.append(f"{img}\t{lab}")
        (root / "list" / "cityscapes" / f"{split}.lst").write_text("\n".join(lines) + "\n")
    return base


def block_label(rng, h=H, w=W, block=8, high=19):
    """8x8 blocks of random class ids, so a shift or flip of the label changes most pixels."""
    return np.kron(rng.integers(0, high, size=(h // block, w // block)), np.ones((block, block), dtype=np.int64))


def encode(label):
    """An RGB image whose value tells its label (12 * id), to check image/label alignment after transforms."""
    return np.repeat((label * 12).astype(np.uint8)[..., None], 3, axis=2)


def decode(image):
    return torch.round((image * STD + MEAN) * 255 / 12).long()


CITYSCAPES_VALUES = list(range(34)) + [34, 100, 254, 255]  # every id, and values the table lacks


@pytest.fixture
def ids_tree(tmp_path):
    rng = np.random.default_rng(0)
    labels = [rng.choice(CITYSCAPES_VALUES, size=(H, W)) for _ in range(2)]
    labels[0].flat[:len(CITYSCAPES_VALUES)] = CITYSCAPES_VALUES
    images = [rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8) for _ in range(2)]
    write_tree(tmp_path / "data", {"train": list(zip(images, labels)), "val": list(zip(images, labels)),
                                   "test": [(images[0], None)]})
    return tmp_path / "data", images, labels


@pytest.fixture
def aligned_tree(tmp_path):
    rng = np.random.default_rng(1)
    labels = [block_label(rng) for _ in range(3)]
    write_tree(tmp_path / "data", {"train": [(encode(y), y) for y in labels], "val": [(encode(y), y) for y in labels]})
    return tmp_path / "data", labels


# ---------------------------------------------------------------- label mapping, test split
@pytest.mark.parametrize("ignore", [255, -1])
def test_cityscapes_ids_map_to_train_ids(ids_tree, ignore):
    root, images, labels = ids_tree
    test = build_dataset(make_cfg(root, **{"TRAIN.IGNORE_LABEL": ignore}), "test")
    assert len(test) == 2
    for (image, label), raw_image, raw in zip(test, images, labels):
        assert image.dtype == torch.float32 and image.shape == (3, H, W)
        assert label.dtype == torch.int64 and label.shape == (H, W)
        want = torch.tensor(raw_image).permute(2, 0, 1).float().div(255).sub(MEAN).div(STD)
        torch.testing.assert_close(image, want)
        for y in range(H):
            for x in range(W):
                lab = id2label.get(int(raw[y, x]))
                train_id = lab.trainId if lab is not None and lab.trainId not in (255, -1) else ignore
                assert int(label[y, x]) == train_id, (y, x, raw[y, x])
    values = set(test[0][1].unique().tolist())
    assert values == set(range(19)) | {ignore}  # every trainId and the ignore label occur


def test_mapping_none_keeps_values(ids_tree):
    root, _, labels = ids_tree
    test = build_dataset(make_cfg(root, **{"DATASET.LABEL_MAPPING": "none", "DATASET.NUM_CLASSES": 255,
                                           "TRAIN.IGNORE_LABEL": -1}), "test")
    want = torch.tensor(labels[1]).long()
    want[want == 255] = -1
    assert torch.equal(test[1][1], want)


def test_test_split_is_whole_images_without_augmentation(aligned_tree):
    root, labels = aligned_tree
    cfg = make_cfg(root, **{"DATASET.LABEL_MAPPING": "none", "TRAIN.IMAGE_SIZE": [16, 8],
                            "TRAIN.DOWNSAMPLERATE": 2, "DATASET.AUGMENT": True})
    test = build_dataset(cfg, "test")
    for i, y in enumerate(labels):
        image, label = test[i]
        assert image.shape == (3, H, W) and torch.equal(label, torch.tensor(y))
        assert torch.equal(decode(image)[0], label)
    train_plain = build_dataset(cfg, "train", augment=False)  # evaluation on the training list: also whole
    assert train_plain[2][0].shape == (3, H, W) and torch.equal(train_plain[2][1], torch.tensor(labels[2]))


def test_test_list_without_labels_is_all_ignore(ids_tree):
    root, images, _ = ids_tree
    image, label = build_dataset(make_cfg(root, **{"DATASET.TEST_SET": "list/cityscapes/test.lst"}), "test")[0]
    assert image.shape == (3, H, W) and torch.equal(label, torch.full((H, W), 255))


# ---------------------------------------------------------------- training transforms
def train_set(root, **kw):
    kw = {"DATASET.LABEL_MAPPING": "none", "TRAIN.MULTI_SCALE": False, "TRAIN.FLIP": True, **kw}
    return build_dataset(make_cfg(root, **kw), "train")


def test_crop_pad_flip_keep_image_and_label_aligned(aligned_tree):
    root, labels = aligned_tree
    ds = train_set(root, **{"TRAIN.IMAGE_SIZE": [32, 32]})  # wider than H: pads 8 rows, crops 32 of 48 columns
    pad_value = (0 - MEAN) / STD
    seen = set()
    for seed in range(24):
        torch.manual_seed(seed)
        image, label = ds[seed % 3]
        full = torch.tensor(labels[seed % 3])
        assert image.shape == (3, 32, 32) and label.shape == (32, 32) and label.dtype == torch.int64
        assert (label[H:] == 255).all() and torch.allclose(image[:, H:], pad_value.expand(3, 32 - H, 32))
        assert torch.equal(decode(image[:, :H])[0], label[:H])  # every pixel's image value tells its label
        matches = [(x, flip) for x in range(W - 32 + 1) for flip in (False, True)
                   if torch.equal(label[:H], (full.flip(-1) if flip else full)[:, x:x + 32])]
        assert matches, seed
        seen.update(matches)
    assert {flip for _, flip in seen} == {False, True} and len({x for x, _ in seen}) > 3


def test_downsample_rate_subsamples_the_cropped_label(aligned_tree):
    root, _ = aligned_tree
    full = train_set(root, **{"TRAIN.IMAGE_SIZE": [32, 16]})
    half = train_set(root, **{"TRAIN.IMAGE_SIZE": [32, 16], "TRAIN.DOWNSAMPLERATE": 2})
    for seed in range(4):
        torch.manual_seed(seed)
        image, label = full[0]
        torch.manual_seed(seed)
        image2, label2 = half[0]
        assert torch.equal(image, image2) and label2.shape == (8, 16)
        assert torch.equal(label2, label[::2, ::2])


def test_multi_scale_sizes_follow_base_size_and_scale_factor(aligned_tree):
    root, _ = aligned_tree
    # long side BASE_SIZE * (0.5 + k / 10), k = 0..10: 24..72 pixels wide; a 80x40 crop pads every size
    ds = train_set(root, **{"TRAIN.MULTI_SCALE": True, "TRAIN.FLIP": False, "TRAIN.BASE_SIZE": 48,
                            "TRAIN.SCALE_FACTOR": 10, "TRAIN.IMAGE_SIZE": [80, 40]})
    allowed = {int(48 * (0.5 + k / 10) + 0.5) for k in range(11)}
    widths = set()
    torch.manual_seed(0)
    for _ in range(40):
        _, label = ds[1]
        valid = label != 255
        w, h = int(valid[0].sum()), int(valid[:, 0].sum())
        assert valid[:h, :w].all() and not valid[h:].any() and not valid[:, w:].any()
        assert w in allowed and h == int(H * w / W + 0.5)  # aspect kept
        widths.add(w)
    assert len(widths) >= 6


def test_rescale_is_nearest_for_labels_and_keeps_alignment(aligned_tree):
    root, labels = aligned_tree
    # SCALE_FACTOR 0: always scale 0.5, here a long side of 96 = 2x upsampling; the crop is the whole image
    ds = train_set(root, **{"TRAIN.MULTI_SCALE": True, "TRAIN.FLIP": False, "TRAIN.BASE_SIZE": 192,
                            "TRAIN.SCALE_FACTOR": 0, "TRAIN.IMAGE_SIZE": [96, 48]})
    image, label = ds[0]
    full = torch.tensor(labels[0])
    assert torch.equal(label, full.repeat_interleave(2, 0).repeat_interleave(2, 1))
    inside = torch.zeros(48, 96, dtype=torch.bool)  # bilinear blends across block edges; block interiors not
    for r in range(0, 48, 16):
        for c in range(0, 96, 16):
            inside[r + 1:r + 15, c + 1:c + 15] = True
    assert torch.equal(decode(image)[0][inside], label[inside])


def test_randomness_comes_from_torch_only(aligned_tree):
    root, _ = aligned_tree
    ds = train_set(root, **{"TRAIN.MULTI_SCALE": True, "TRAIN.BASE_SIZE": 48, "TRAIN.IMAGE_SIZE": [16, 16]})
    draws = []
    for other in range(2):
        random.seed(other)
        np.random.seed(other)
        torch.manual_seed(7)
        draws.append([ds[i] for i in range(3)])
    for (a, b), (c, d) in zip(*draws):
        assert torch.equal(a, c) and torch.equal(b, d)
    torch.manual_seed(8)
    assert any(not torch.equal(ds[i][1], y) for i, (_, y) in enumerate(draws[0]))


def test_loader_with_workers_is_reproducible(aligned_tree):
    root, _ = aligned_tree
    cfg = make_cfg(root, **{"DATASET.LABEL_MAPPING": "none", "TRAIN.IMAGE_SIZE": [16, 16], "TRAIN.BASE_SIZE": 48,
                            "WORKERS": 2, "TRAIN.BATCH_SIZE_PER_GPU": 3})
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        loader = build_loader(cfg, "train")
        loader.sampler.set_epoch(1)
        runs.append(next(iter(loader)))
    assert runs[0][0].shape == (3, 3, 16, 16) and runs[0][1].shape == (3, 16, 16)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


# ---------------------------------------------------------------- bad input
def _break(root, case):
    base, lists = root / "cityscapes", root / "list" / "cityscapes"
    first = (lists / "train.lst").read_text().splitlines()[0].split()
    if case == "list":
        (lists / "train.lst").unlink()
        return "train.lst"
    if case == "image":
        (base / first[0]).unlink()
        return first[0]
    if case == "label":
        (base / first[1]).unlink()
        return first[1]
    if case == "size":
        Image.fromarray(np.zeros((H, W + 2), dtype=np.uint8)).save(base / first[1])
        return first[1]
    if case == "column":
        lines = (lists / "train.lst").read_text().splitlines()
        (lists / "train.lst").write_text("\n".join([lines[0], lines[1].split()[0]]) + "\n")
        return "train.lst:2"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["list", "image", "label", "size", "column"])
def test_bad_input_raises_dataset_error_naming_the_file(ids_tree, case):
    root = ids_tree[0]
    named = _break(root, case)
    with pytest.raises(DatasetError) as err:
        build_dataset(make_cfg(root), "train")
    msg = str(err.value)
    assert named in msg and "\n" not in msg
    expected = {"list": "list file not found", "image": "image file not found", "label": "label file not found",
                "size": "must match", "column": "expected 2 columns"}[case]
    assert expected in msg


def test_label_size_checked_again_when_read(ids_tree):
    root = ids_tree[0]
    ds = build_dataset(make_cfg(root), "test")
    lab = ds.files[0].label
    Image.fromarray(np.zeros((H + 1, W), dtype=np.uint8)).save(lab)  # changed after the list was read
    with pytest.raises(DatasetError, match="must match") as err:
        ds[0]
    assert lab in str(err.value)


def test_label_values_beyond_num_classes(ids_tree):
    root = ids_tree[0]
    ds = build_dataset(make_cfg(root, **{"DATASET.LABEL_MAPPING": "none", "DATASET.NUM_CLASSES": 19}), "test")
    with pytest.raises(DatasetError, match="NUM_CLASSES=19") as err:
        ds[0]
    assert ds.files[0].label in str(err.value)


def test_bad_input_through_a_tool_is_one_line_exit_2(ids_tree):
    root = ids_tree[0]
    named = _break(root, "size")
    code = textwrap.dedent(f"""
        from deqlab.config.defaults import DEFAULTS
        from deqlab.data import build_dataset
        from deqlab.engine.cli import run_tool
        cfg = DEFAULTS.clone()
        cfg.merge_from_list(["DATASET.DATASET", "cityscapes", "DATASET.ROOT", {str(root)!r},
                             "DATASET.TRAIN_SET", "list/cityscapes/train.lst"])
        run_tool(lambda: build_dataset(cfg, "train"))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0]


# ---------------------------------------------------------------- fashion_scenes
def write_fake_fashion(root, n_train=30, n_test=12):
    """Raw IDX files under ``root/fashion_mnist/FashionMNIST/raw``: full-intensity squares (so every pasted
    pixel is visible), train classes 0-4 and test classes 5-9 so a scene tells which split it came from."""
    raw = root / "fashion_mnist" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n, first in (("train", n_train, 0), ("t10k", n_test, 5)):
        labels = (first + np.arange(n) % 5).astype(np.uint8)
        images = np.full((n, 28, 28), 255, dtype=np.uint8)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
            (raw / f"{prefix}-{kind}-ubyte").write_bytes(header + arr.tobytes())
    return root


def read_scene_tree(folder, split):
    lines = (folder / "list" / "fashion_scenes" / f"{split}.lst").read_text().split("\n")
    pairs = [line.split() for line in lines if line]
    return [(np.asarray(Image.open(folder / a)), np.asarray(Image.open(folder / b))) for a, b in pairs]


def test_paste_item_labels_visible_pixels_and_occludes():
    canvas = np.zeros((6, 8, 3), dtype=np.uint8)
    label = np.zeros((6, 8), dtype=np.uint8)
    first = np.full((4, 4), 200, dtype=np.uint8)
    second = np.array([[fs.VISIBLE_THRESHOLD + 1, fs.VISIBLE_THRESHOLD]] * 2, dtype=np.uint8)
    fs.paste_item(canvas, label, first, 2, 1, 1, np.array([1.0, 0.5, 0.25]))
    fs.paste_item(canvas, label, second, 7, 2, 3, np.ones(3))
    want = np.zeros((6, 8), dtype=np.uint8)
    want[1:5, 1:5] = 3
    want[2:4, 3] = 8  # above the threshold: visible, occludes the first item
    np.testing.assert_array_equal(label, want)
    np.testing.assert_array_equal(canvas[2, 3], [138, 138, 138])  # 41 lifted to 115 + 140 * 41 / 255
    np.testing.assert_array_equal(canvas[2, 4], [225, 112, 56])  # at the threshold: the first item shows
    assert not canvas[label == 0].any()


def test_fashion_scenes_generated_on_first_use(tmp_path, monkeypatch):
    root = write_fake_fashion(tmp_path / "data")
    monkeypatch.setattr(fs, "N_TRAIN", 10)
    monkeypatch.setattr(fs, "N_VAL", 6)
    cfg = make_cfg(root, "fashion_scenes", **{"DATASET.LABEL_MAPPING": "none", "DATASET.NUM_CLASSES": 11,
                                               "TRAIN.IMAGE_SIZE": [64, 32], "TRAIN.BASE_SIZE": 128})
    test = build_dataset(cfg, "test")
    folder = root / "fashion_scenes"
    for split, n in (("train", 10), ("val", 6)):
        assert len(list((folder / "leftImg8bit" / split / "scene").glob("scene_*_leftImg8bit.png"))) == n
        assert len(list((folder / "gtFine" / split / "scene").glob("scene_*_gtFine_labelIds.png"))) == n
    assert sorted(os.listdir(root)) == ["fashion_mnist", "fashion_scenes"]  # no temporary folder left
    assert len(test) == 6 and test[0][0].shape == (3, 64, 128) and test[0][1].shape == (64, 128)
    train = build_dataset(cfg, "train")
    assert len(train) == 10 and train[0][0].shape == (3, 32, 64)
    splits = {s: read_scene_tree(folder, s) for s in ("train", "val")}
    values = {s: set(np.unique(np.stack([y for _, y in pairs])).tolist()) for s, pairs in splits.items()}
    assert values["train"] <= set(range(0, 6)) and values["val"] <= {0, 6, 7, 8, 9, 10}  # from their own split
    assert len(values["train"]) > 3 and len(values["val"]) > 3
    for image, label in splits["train"] + splits["val"]:
        assert image.shape == (64, 128, 3) and label.shape == (64, 128)
        # items are tinted 255 squares (every channel >= 0.7 * 255), the background stays below 140
        np.testing.assert_array_equal(label > 0, image.min(axis=2) >= 140)
    stamp = os.stat(folder / "gtFine" / "val" / "scene" / "scene_00000_gtFine_labelIds.png").st_mtime_ns
    assert fs.generate_fashion_scenes(str(folder), 10, 6) is False  # present: nothing regenerated
    build_dataset(cfg, "test")
    assert os.stat(folder / "gtFine" / "val" / "scene" / "scene_00000_gtFine_labelIds.png").st_mtime_ns == stamp


def test_fashion_scenes_generation_is_deterministic(tmp_path):
    root = write_fake_fashion(tmp_path)
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert fs.generate_fashion_scenes(str(tmp_path / name), 5, 3, seed, fashion_dir=str(root / "fashion_mnist"))
    files = sorted(str(p.relative_to(tmp_path / "a")) for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 2 * 8 + 3
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    scene = "leftImg8bit/val/scene/scene_00002_leftImg8bit.png"
    assert (tmp_path / "a" / scene).read_bytes() != (tmp_path / "c" / scene).read_bytes()


def _generate(folder, fashion_dir, barrier, results):
    barrier.wait()
    results.put(fs.generate_fashion_scenes(folder, 30, 10, 0, fashion_dir=fashion_dir))


def test_fashion_scenes_racing_processes_share_one_tree(tmp_path):
    root = write_fake_fashion(tmp_path)
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    args = (str(tmp_path / "fashion_scenes"), str(root / "fashion_mnist"), barrier, results)
    procs = [ctx.Process(target=_generate, args=args) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(results.get(timeout=5) for _ in procs) == [False, True]  # one wrote it, one kept it
    assert sorted(os.listdir(tmp_path)) == ["fashion_mnist", "fashion_scenes"]
    assert len(read_scene_tree(tmp_path / "fashion_scenes", "train")) == 30


def test_fashion_scenes_refuses_foreign_or_different_trees(tmp_path, monkeypatch):
    root = write_fake_fashion(tmp_path)
    fashion_dir = str(root / "fashion_mnist")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("not scenes")
    with pytest.raises(DatasetError, match="not a complete generated tree"):
        fs.generate_fashion_scenes(str(tmp_path / "other"), 2, 2, fashion_dir=fashion_dir)
    fs.generate_fashion_scenes(str(tmp_path / "s"), 2, 2, fashion_dir=fashion_dir)
    with pytest.raises(DatasetError, match="delete it"):
        fs.generate_fashion_scenes(str(tmp_path / "s"), 3, 2, fashion_dir=fashion_dir)
    monkeypatch.setenv("DEQLAB_FASHION_MNIST_DEBIAN", str(tmp_path / "nodeb"))
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        fs.generate_fashion_scenes(str(tmp_path / "new"), 2, 2, fashion_dir=str(tmp_path / "empty"))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # the temporary tree is gone
    with pytest.raises(ConfigError, match="LABEL_MAPPING none"):
        build_dataset(make_cfg(tmp_path, "fashion_scenes"), "test")  # the default mapping is cityscapes


@pytest.mark.skipif(not os.path.isfile(os.path.join(DEBIAN_FASHION_DIR, "train-images-idx3-ubyte.gz"))
                    and os.environ.get("CI") != "true",
                    reason=f"Debian package dataset-fashion-mnist not installed ({DEBIAN_FASHION_DIR})")
def test_fashion_scenes_from_real_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.delenv("DEQLAB_FASHION_MNIST_DEBIAN", raising=False)
    folder = tmp_path / "fashion_scenes"
    assert fs.generate_fashion_scenes(str(folder), 12, 6)
    assert (tmp_path / "fashion_mnist" / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte").is_file()
    labels = np.stack([y for split in ("train", "val") for _, y in read_scene_tree(folder, split)])
    assert labels.max() <= 10 and len(np.unique(labels)) >= 8
    assert 0.1 < (labels > 0).mean() < 0.6  # items cover part of each scene, the background the rest
