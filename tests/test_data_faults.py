"""Damaged data files, as users meet them: every loader (torchvision on class folders and recordIO, DALI's CPU
pipeline, the segmentation lists), in the main process and in DataLoader workers, ends in one line naming the
file or record, exit 2, and writes nothing; make_recordio refuses a damaged image."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import (IMAGENET_TINY_OVERRIDES, REPO, SEG_TINY_OVERRIDES, in_tmp, needs_debian_fashion,
                      write_jpeg_tree, write_seg_tree)
from deqlab.checkpoint import save_checkpoint
from deqlab.config import load_config
from deqlab.data.recordio import MAGIC, RecordIOWriter, open_recordio
from deqlab.models import build_model

sys.path.insert(0, str(REPO / "tools"))
from make_recordio import make_recordio  # noqa: E402

pytestmark = [needs_debian_fashion, pytest.mark.timeout(300), pytest.mark.xdist_group("data_faults")]
CLS_CFG = REPO / "experiments/imagenet/cls_mdeq_SMALL.yaml"
SEG_CFG = REPO / "experiments/cityscapes/seg_mdeq_SMALL.yaml"
# DALI's image decoders (nvImageCodec, libjpeg-turbo) print their own diagnostics on stderr from C++ threads,
# before the error reaches Python; there is no level that silences them (DALI_NVIMGCODEC_LOG_LEVEL=1 still shows
# errors). They may land after a progress bar.
DALI_LOG = re.compile(r"\[ERROR\] \S*\[\w+\] |Input file read error$")


def cut(path, keep=0.5):
    """Truncate ``path`` to ``keep`` of its bytes (a fraction, or a byte count): a copy that stopped early."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])


def run(args, timeout=240):
    """The tool's process; its output decoded without newline translation (text mode would turn the progress
    bar's carriage returns into line breaks)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env, capture_output=True, timeout=timeout)
    proc.stdout, proc.stderr = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    return proc


def assert_one_line_error(proc, *needles, dali=False):
    """Exit 2 and stderr, as a terminal shows it, is one ``error:`` line holding ``needles`` (with ``dali``, DALI's
    own decoder log lines may precede it). A terminal shows what follows a line's last carriage return: the
    progress bar, erased by tqdm when the evaluation fails, is overwritten by the error."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    shown = [line.rsplit("\r", 1)[-1] for line in proc.stderr.split("\n")]
    lines = [line for line in shown if line.strip() and not (dali and DALI_LOG.search(line))]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for needle in needles:
        assert str(needle) in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A good ImageNet-layout JPEG tree, its recordIO twin, and random tiny-model weights to evaluate."""
    tmp = tmp_path_factory.mktemp("good")
    root = write_jpeg_tree(tmp / "imagenet")
    for split in ("train", "val"):
        make_recordio(root / split, tmp / "rec" / split, progress=False)
    weights = tmp / "tiny.pth"
    save_checkpoint(weights, {"model": build_model(load_config(CLS_CFG, IMAGENET_TINY_OVERRIDES)).state_dict()})
    return root, tmp / "rec", weights


def evaluate(data, weights, tmp_path, *overrides):
    """tools/cls_valid.py on ``data`` with a results CSV that a failed evaluation must not write; returns the
    process."""
    results = tmp_path / "results.csv"
    proc = run(["tools/cls_valid.py", "--cfg", CLS_CFG, "--results_name", results, *IMAGENET_TINY_OVERRIDES,
                "DATASET.ROOT", data, "TEST.MODEL_FILE", weights, "TEST.BATCH_SIZE_PER_GPU", "8", "DEVICE", "cpu",
                "OUTPUT_DIR", tmp_path / "out", "LOG_DIR", tmp_path / "log", *overrides])
    assert not results.exists()  # no row (nor header) for a failed evaluation
    return proc


def damaged_tree(good_root, tmp_path, keep=0.5, first=0):
    """A copy of the good tree whose val images ``first`` and ``first + 8`` (in loading order: in two batches)
    are truncated to ``keep``."""
    root = shutil.copytree(good_root, tmp_path / "imagenet")
    files = sorted((root / "val").rglob("*.JPEG"))
    for path in (files[first], files[first + 8]):
        cut(path, keep)
    return root, files[first]


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_jpeg_in_a_class_folder(good, tmp_path, workers):
    root, bad = damaged_tree(good[0], tmp_path)
    line = assert_one_line_error(evaluate(root, good[2], tmp_path, "WORKERS", workers), bad, "cannot decode the image")
    assert "truncated" in line.lower()  # PIL's reason, kept whole


@pytest.mark.parametrize("keep", [0.5, 200])
def test_truncated_jpeg_with_dali(good, tmp_path, keep):
    """Cut in half, DALI names the file; cut to 200 bytes it says only "nvImageCodec failure", and the file is
    found by decoding the images from the failing batch on."""
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI not installed")
    root, bad = damaged_tree(good[0], tmp_path, keep, first=13)
    proc = evaluate(root, good[2], tmp_path, "DATASET.LOADER", "dali", "DATASET.DALI_DEVICE", "cpu", "WORKERS", 2)
    assert_one_line_error(proc, f"error: {bad}: ", "cannot decode the image", dali=True)


def test_truncated_jpeg_in_a_shuffled_dali_train_epoch(good, tmp_path):
    """Cut in half, not to 200 bytes: DALI 2.4's CPU image_random_crop sometimes segfaults on a JPEG cut to its
    header (inside Pipeline.run, before any error reaches Python)."""
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI not installed")
    from deqlab.data import build_loader
    from deqlab.errors import DatasetError

    root = shutil.copytree(good[0], tmp_path / "imagenet")
    bad = sorted((root / "train").rglob("*.JPEG"))[30]
    cut(bad)
    cfg = load_config(CLS_CFG, IMAGENET_TINY_OVERRIDES + ["DATASET.ROOT", str(root), "DATASET.LOADER", "dali",
                                                          "DATASET.DALI_DEVICE", "cpu", "WORKERS", "2"])
    with pytest.raises(DatasetError) as err:
        list(build_loader(cfg, "train"))
    assert str(err.value) == f"{bad}: DALI cannot decode the image; replace or remove the file"


def write_bad_magic(good_rec, tmp_path, record=5):
    """A copy of the good recordIO pair whose record ``record`` starts with a zeroed magic number."""
    data = shutil.copytree(good_rec, tmp_path / "rec")
    offset = open_recordio(data / "val.rec").offsets[record]
    raw = bytearray((data / "val.rec").read_bytes())
    assert int.from_bytes(raw[offset:offset + 4], "little") == MAGIC
    raw[offset:offset + 4] = bytes(4)
    (data / "val.rec").write_bytes(bytes(raw))
    return data, f"{data / 'val.rec'} record {record} (byte {offset})"


@pytest.mark.parametrize("loader", ["torchvision", "dali"])
def test_recordio_with_a_bad_magic_number(good, tmp_path, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI not installed")
    data, record = write_bad_magic(good[1], tmp_path)
    proc = evaluate(data, good[2], tmp_path, "DATASET.DATA_FORMAT", "rec", "DATASET.LOADER", loader, "WORKERS", 2)
    assert_one_line_error(proc, f"error: {record}: bad magic number 0x00000000", "make_recordio.py", dali=True)


@pytest.mark.parametrize("loader", ["torchvision", "dali"])
def test_recordio_holding_a_truncated_jpeg(good, tmp_path, loader):
    """A .rec packed by another tool (here our writer, bypassing make_recordio's check) with a cut JPEG."""
    if loader == "dali":
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI not installed")
    shutil.copytree(good[1], tmp_path / "rec")
    files = sorted((good[0] / "val").rglob("*.JPEG"))
    with RecordIOWriter(tmp_path / "rec" / "val") as writer:
        for i, path in enumerate(files):
            data = path.read_bytes()
            writer.write(int(path.parent.name.split("_")[1]), data[: len(data) // 2] if i == 3 else data)
    proc = evaluate(tmp_path / "rec", good[2], tmp_path, "DATASET.DATA_FORMAT", "rec", "DATASET.LOADER", loader,
                    "WORKERS", 2)
    record = f"{tmp_path / 'rec' / 'val.rec'} record 3 (byte {open_recordio(tmp_path / 'rec' / 'val.rec').offsets[3]})"
    assert_one_line_error(proc, f"error: {record}: ", "cannot decode the image", dali=True)


def test_make_recordio_refuses_a_damaged_image_and_keeps_the_old_files(good, tmp_path):
    root, bad = damaged_tree(good[0], tmp_path)
    out = tmp_path / "packed" / "val"
    shutil.copytree(good[1], out.parent)
    before = {p.name: p.read_bytes() for p in out.parent.iterdir()}
    proc = run(["tools/make_recordio.py", "--src", root / "val", "--out", out, "--force"])
    assert_one_line_error(proc, f"error: {bad}: cannot decode the image")
    assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == before  # nothing replaced, no temp files
    proc = run(["tools/make_recordio.py", "--src", root / "val", "--out", tmp_path / "fresh", "--resize", "20"])
    assert_one_line_error(proc, bad)
    assert list(tmp_path.glob("fresh*")) == []


@pytest.fixture
def seg_tree(tmp_path):
    """A tiny Cityscapes tree whose first val image PNG is cut in half (its header, with the size, is intact: the
    list check passes and decoding fails), and random weights of the tiny segmenter."""
    write_seg_tree(tmp_path / "data")
    bad = tmp_path / "data" / "cityscapes" / (tmp_path / "data/list/cityscapes/val.lst").read_text().split()[0]
    cut(bad)
    weights = tmp_path / "seg.pth"
    cfg = load_config(SEG_CFG, SEG_TINY_OVERRIDES)
    save_checkpoint(weights, {"model": build_model(cfg, task="seg").state_dict()})
    return [*in_tmp(SEG_TINY_OVERRIDES, tmp_path), "TEST.MODEL_FILE", weights], bad


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_png_in_a_segmentation_list(seg_tree, tmp_path, workers):
    overrides, bad = seg_tree
    proc = run(["tools/seg_test.py", "--cfg", SEG_CFG, *overrides, "WORKERS", workers])
    assert_one_line_error(proc, f"error: {bad}: cannot decode the image")


def test_corrupt_png_while_training_with_workers(seg_tree, tmp_path):
    """seg_train reads the val list at the end of the epoch; the (left) epoch bar may stand above the error."""
    overrides, bad = seg_tree
    proc = run(["tools/seg_train.py", "--cfg", SEG_CFG, *overrides, "WORKERS", 2, "TRAIN.END_EPOCH", "1"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line.rsplit("\r", 1)[-1] for line in proc.stderr.split("\n") if line.strip()]
    assert lines[-1].startswith(f"error: {bad}: cannot decode the image") and "Traceback" not in proc.stderr
    assert all(line.startswith("epoch 1/1:") for line in lines[:-1]), proc.stderr[-3000:]
    assert not list((tmp_path / "out").rglob("model_best*"))


def test_a_worker_error_keeps_its_one_line_message(tmp_path):
    """What torch hands the main process for a DatasetError raised in a worker is that error, message intact."""
    from torch.utils.data import DataLoader, Dataset

    from deqlab.errors import DatasetError

    class Broken(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            raise DatasetError(f"{tmp_path}/x.png: cannot decode the image (broken)")

    with pytest.raises(DatasetError) as err:
        next(iter(DataLoader(Broken(), num_workers=1)))
    assert str(err.value) == f"{tmp_path}/x.png: cannot decode the image (broken)"
    assert str(DatasetError("Caught nothing")) == "Caught nothing"  # ordinary messages untouched
