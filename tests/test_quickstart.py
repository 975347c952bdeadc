"""The front door: ``scripts/quickstart.sh`` end to end for each task, with budgets cut to seconds (the real
runs are measured in the README). Everything goes under a temporary folder; nothing is downloaded."""
import csv
import os
import re
import shutil
import subprocess

import pytest
from PIL import Image

from conftest import REPO, needs_debian_fashion

pytestmark = pytest.mark.timeout(600)
SCRIPT = REPO / "scripts/quickstart.sh"


def quickstart(tmp_path, *args: str) -> str:
    # installed already (scripts/test.sh): a pip install in the middle of the suite would swap the package under
    # the tests still running
    env = {**os.environ, "DEQLAB_ALLOW_DOWNLOAD": "0", "DEQLAB_NO_INSTALL": "1"}
    out = subprocess.run(["bash", str(SCRIPT), *args, "OUTPUT_DIR", str(tmp_path / "out"),
                          "LOG_DIR", str(tmp_path / "log")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def assert_curves(run_dir, out: str) -> None:
    """The run's curves.png (tools/plot_run.py), written beside its checkpoints and announced."""
    assert f"wrote {run_dir / 'curves.png'}" in out
    assert Image.open(run_dir / "curves.png").size[0] > 1000  # five panels side by side


def last_number(pattern: str, text: str) -> float:
    return float(re.findall(pattern, text)[-1])


@needs_debian_fashion
def test_classification_quickstart(tmp_path):
    out = quickstart(tmp_path, "TRAIN.END_EPOCH", "1", "PERCENT", "0.02", "TRAIN.PRETRAIN_STEPS", "5",
                     "DEQ.F_THRES", "3", "TRAIN.PRECISE_BN_BATCHES", "2", "DATASET.ROOT", str(tmp_path / "data"))
    accuracy = last_number(r"test accuracy \(top-1, %\): ([\d.]+)", out)
    assert 10.0 < accuracy <= 100.0  # above chance after one short epoch on the real images
    assert (tmp_path / "out/fashion_mnist/cls_mdeq_quickstart/final_state.pth").is_file()
    assert_curves(tmp_path / "out/fashion_mnist/cls_mdeq_quickstart", out)


@needs_debian_fashion
def test_segmentation_quickstart(tmp_path):
    out = quickstart(tmp_path, "seg", "TRAIN.END_EPOCH", "1", "PERCENT", "0.05", "TRAIN.PRETRAIN_STEPS", "5",
                     "DEQ.F_THRES", "3", "DEQ.B_THRES", "3", "TRAIN.PRECISE_BN_BATCHES", "2",
                     "DATASET.ROOT", str(tmp_path / "data"))
    assert 0.0 < last_number(r"test mIoU \(%\): ([\d.]+)", out) <= 100.0
    run = tmp_path / "out/fashion_scenes/seg_mdeq_quickstart"
    assert (run / "final_state.pth").is_file()
    panels = sorted((run / "predictions/panels").glob("*.png"))
    assert len(panels) == 4 and Image.open(panels[0]).size == (4 * 128, 64)  # four 128x64 scene panes
    assert len(list((run / "predictions").glob("*.png"))) == len(list((run / "predictions/colour").glob("*.png")))
    assert_curves(run, out)


@pytest.mark.skipif(shutil.which("apt-get") is None and os.environ.get("CI") != "true",
                    reason="the Austen corpus is built from Debian's r-cran-janeaustenr (apt-get download)")
def test_language_model_quickstart(tmp_path):
    out = quickstart(tmp_path, "lm", "TRAIN.MAX_STEP", "20", "TRAIN.PRETRAIN_STEPS", "10", "TRAIN.WARMUP_STEPS", "5",
                     "TRAIN.EVAL_INTERVAL", "10", "DATASET.ROOT", str(tmp_path / "austen"))
    assert (tmp_path / "austen/train.txt").is_file()  # the corpus, built where the config says
    with open(tmp_path / "out/austen/deq_transformer_quickstart/quickstart_sweep.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["f_thres"]) for r in rows] == [2, 4, 8, 16, 32]
    residuals = [float(r["fwd_residual"]) for r in rows]
    assert residuals[-1] < residuals[0]  # a larger test-time budget solves further
    assert f"F_THRES 32: test ppl {float(rows[-1]['ppl']):7.2f}" in out
    assert "unigram perplexity of the test split" in out
    lines = out.splitlines()
    assert any(line.startswith("It is a truth universally acknowledged ") for line in lines)  # the paragraph
    assert re.search(r"^warm start: [\d.]+ tokens/s, [\d.]+ f evaluations per token$", out, re.M)
    assert re.search(r"^cold start: [\d.]+ tokens/s, [\d.]+ f evaluations per token$", out, re.M)
    assert lines[-1].startswith("warm and cold starts agree on ") and lines[-1].endswith(" of 120 tokens")
    assert_curves(tmp_path / "out/austen/deq_transformer_quickstart", out)
