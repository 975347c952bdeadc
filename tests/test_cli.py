"""The tools as users run them: torchrun / torch.distributed.launch, cls_valid's CSV, one-line errors."""
import csv
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from deqlab.config import load_config
from deqlab.models import build_model
from deqlab.utils.sweep import load_series

from conftest import REPO

OUT = "out/fashion_mnist/cls_mdeq_quickstart"


def run(args, tmp_path, env_extra=None, timeout=300):
    env = {**os.environ, "DEQLAB_FASHION_MNIST_DEBIAN": str(tmp_path / "no-debian"), "OMP_NUM_THREADS": "1",
           **(env_extra or {})}
    env.pop("DEQLAB_ALLOW_DOWNLOAD", None)
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def tool(name):
    return [sys.executable, str(REPO / "tools" / name)]


@pytest.fixture
def trained(tiny_run):
    """A finished 2-process run (torchrun) of the tiny config."""
    path, overrides, tmp = tiny_run
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(REPO / "tools/cls_train.py"), "--cfg", str(path), *overrides], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return path, overrides, tmp


def test_torchrun_trains_and_cls_valid_appends_csv_rows(trained):
    path, overrides, tmp = trained
    ckpt = tmp / OUT / "final_state.pth"
    assert ckpt.is_file() and (tmp / OUT / "train.log").read_text().count("epoch 2/2") == 1  # rank 0 only logs
    csv_path = tmp / "sweep.csv"
    for f_thres in (2, 8):
        proc = run(tool("cls_valid.py") + ["--cfg", str(path), "--results_name", str(csv_path), *overrides,
                                            "TEST.MODEL_FILE", str(ckpt), "DEQ.F_THRES", str(f_thres)], tmp)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "test accuracy (top-1, %):" in proc.stdout
    rows = list(csv.DictReader(csv_path.open()))
    assert [int(r["f_thres"]) for r in rows] == [2, 8] and all(int(r["count"]) == 16 for r in rows)
    assert float(rows[0]["fwd_steps"]) <= 2 < float(rows[1]["fwd_steps"])
    proc = run([sys.executable, str(REPO / "tools/plot_sweep.py"), str(csv_path)], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Image.open(tmp / "sweep.png").size == (1200, 480)


def test_plot_sweep_reads_series_and_rejects_other_csvs(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("checkpoint,f_thres,perf,fwd_residual\na.pth,8,90.0,0.02\na.pth,2,50.0,0.7\nb.pth,4,80,0.1\n")
    assert load_series(path) == {"a.pth": [(2, 50.0, 0.7), (8, 90.0, 0.02)], "b.pth": [(4, 80.0, 0.1)]}
    path.write_text("config,top1\nx.yaml,90\n")
    with pytest.raises(ValueError, match=r"s\.csv:2: expected a cls_valid\.py --results_name row"):
        load_series(path)


def test_the_deprecated_launcher_passes_local_rank_and_works(tiny_run):
    path, overrides, tmp = tiny_run
    proc = run([sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node", "2", "--master_port",
                "29517", str(REPO / "tools/cls_train.py"), "--cfg", str(path), *overrides, "TRAIN.END_EPOCH", "1"],
               tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp / OUT / "final_state.pth").is_file()


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_config_input_is_one_line(tiny_run):
    path, overrides, tmp = tiny_run
    assert_one_line_error(run(tool("cls_train.py") + ["--cfg", "nope.yaml"], tmp), "nope.yaml not found")
    assert_one_line_error(run(tool("cls_train.py") + ["--cfg", str(path), "DEQ.F_THRESH", "3"], tmp),
                          "unknown config key DEQ.F_THRESH", "did you mean DEQ.F_THRES")
    assert_one_line_error(run(tool("cls_valid.py") + ["--cfg", str(path), "DEQ.F_THRES", "many"], tmp),
                          "DEQ.F_THRES expects int")
    # locuslab/mdeq's flags still work: --testModel sets TEST.MODEL_FILE
    assert_one_line_error(run(tool("cls_valid.py") + ["--cfg", str(path), "--testModel", "missing.pkl", *overrides],
                              tmp), "checkpoint missing.pkl not found")


def test_a_missing_dataset_says_where_it_looked(tiny_run):
    path, overrides, tmp = tiny_run
    proc = run(tool("cls_train.py") + ["--cfg", str(path), *overrides, "DATASET.ROOT", str(tmp / "empty")], tmp)
    assert_one_line_error(proc, str(tmp / "empty"), "apt-get install dataset-fashion-mnist")
    assert not (tmp / OUT).exists()  # nothing written for a run that could not start


def test_bad_checkpoints_are_one_line_and_damage_nothing(trained):
    path, overrides, tmp = trained
    out = tmp / OUT
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    (tmp / "corrupt.pth").write_bytes((out / "final_state.pth").read_bytes()[:500])
    valid = tool("cls_valid.py") + ["--cfg", str(path), *overrides]
    assert_one_line_error(run(valid + ["TEST.MODEL_FILE", str(tmp / "corrupt.pth")], tmp),
                          "corrupt.pth is not a readable checkpoint")
    other = tmp / "other_config.pth"  # a checkpoint of another config (two output classes)
    torch.save(build_model(load_config(path, overrides + ["MODEL.NUM_CLASSES", "2"])).state_dict(), other)
    assert_one_line_error(run(valid + ["TEST.MODEL_FILE", str(other)], tmp), "does not fit this model",
                          "classifier.weight (2, 16) vs model (10, 16)")
    assert_one_line_error(run(valid, tmp), "TEST.MODEL_FILE is empty")
    train = tool("cls_train.py") + ["--cfg", str(path), *overrides]
    assert_one_line_error(run(train + ["TRAIN.MODEL_FILE", str(tmp / "corrupt.pth")], tmp), "corrupt.pth")
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before
    torch.load(out / "checkpoint.pth", weights_only=True)
