"""scripts/run_mdeq.sh as ImageNet users run it: DALI (CPU) loaders, torchrun, test-time budget, bad input."""
import csv
import os
import shlex
import subprocess

import pytest

from conftest import COMPAT, IMAGENET_TINY_OVERRIDES, REPO, needs_compat, needs_debian_fashion, write_jpeg_tree
from deqlab.config import load_config
from deqlab.engine.evaluator import eval_f_thres
from test_compat import ZOO_IMAGENET

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI not installed: pip install -e '.[dali]' (scripts/test.sh does)")
pytestmark = [needs_debian_fashion, pytest.mark.timeout(300), pytest.mark.xdist_group("run_mdeq")]
MINI4 = ["--cfg", str(COMPAT / "configs/v1_cls_mdeq_MINI4.yaml"), "--resume", str(COMPAT / "cls_mini4_conditioned.pkl")]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_jpeg_tree(tmp_path_factory.mktemp("imagenet"))


def run_mdeq(*args, env_extra=None):
    # PYTHONWARNINGS: the v1 MINI4 yaml warns that it ignores its DEBUG key; the error is the line under test
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::UserWarning", **(env_extra or {})}
    return subprocess.run(["bash", "scripts/run_mdeq.sh", *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=280)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for needle in needles:
        assert needle in lines[0]


@needs_compat
def test_eval_released_checkpoint_over_torchrun(tree, tmp_path):
    """A released-format state_dict evaluated on 2 ranks (gloo) and on 1: every image counted once, the same
    accuracy; --eval_f_max_iter sets the solver steps actually used."""
    csv_path = tmp_path / "budget.csv"
    common = ["--eval", "--data", tree, *MINI4, "--dali-cpu", "--workers", "1", "--results_name", csv_path,
              "DEVICE", "cpu", "DEQ.F_EPS", "1e-12"]
    runs = [run_mdeq(*common, "--eval_f_max_iter", k, "--nproc_per_node", n) for k, n in ((2, 2), (2, 1), (5, 1))]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "(29 samples), F_THRES" in proc.stdout and "top-1" in proc.stdout and "top-5" in proc.stdout
    rows = list(csv.DictReader(csv_path.open()))
    # Broyden (the MINI4 config's solver): F_THRES t is t steps after f(z0), t + 1 f evaluations
    assert [(int(r["f_thres"]), float(r["fwd_steps"]), float(r["fwd_nfe"]), int(r["count"])) for r in rows] == [
        (2, 2.0, 3.0, 29), (2, 2.0, 3.0, 29), (5, 5.0, 6.0, 29)]
    assert rows[0]["top1"] == rows[1]["top1"] and rows[0]["top5"] == rows[1]["top5"]  # sharded == single
    assert float(rows[2]["fwd_residual"]) < float(rows[0]["fwd_residual"])


def test_zoo_line_trains_resumes_and_evaluates_with_dali(tree, tmp_path):
    """deq-zoo's run_mdeq.sh line, verbatim, with tiny overrides appended (flags after them too): train one epoch,
    continue for a second from --resume, then --eval --resume at a test-time budget (--eval_f_max_iter)."""
    save = tmp_path / "runs"
    zoo = shlex.split(ZOO_IMAGENET.replace("YOUR_DATA_PATH", str(tree)))
    # the tree holds class folders; the zoo's recipe (and config) reads recordIO
    tiny = [*IMAGENET_TINY_OVERRIDES, "DATASET.DATA_FORMAT", "jpg", "TRAIN.BATCH_SIZE_PER_GPU", 16,
            "TEST.BATCH_SIZE_PER_GPU", 16, "WORKERS", 1,
            "OUTPUT_DIR", save, "LOG_DIR", save / "log", "--dali-cpu"]
    first = run_mdeq(*zoo, *tiny, "TRAIN.END_EPOCH", 1)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = save / "imagenet" / "cls_mdeq_zoo_small"
    config = (run_dir / "config.yaml").read_text()
    assert "LOADER: dali" in config and "DALI_DEVICE: cpu" in config and "END_EPOCH: 1" in config
    assert "F_SOLVER: fixed_point" in config and "NESTEROV: true" in config and "GRAD: phantom" in config
    assert (run_dir / "final_state.pth").is_file() and (save / "log" / "imagenet" / "cls_mdeq_zoo_small").is_dir()
    second = run_mdeq(*zoo, *tiny, "TRAIN.END_EPOCH", 2, "--resume", run_dir / "checkpoint.pth")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoint.pth'} at epoch 1" in second.stdout
    assert "epoch 2/2" in second.stdout and "epoch 1/2 " not in second.stdout
    csv_path = tmp_path / "budget.csv"
    evaluate = run_mdeq(*zoo, "--eval", *tiny, "DEQ.F_EPS", "1e-12", "--resume", run_dir / "final_state.pth",
                        "--eval_f_max_iter", 3, "--results_name", csv_path)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    (row,) = csv.DictReader(csv_path.open())
    assert (int(row["f_thres"]), int(row["count"]), row["f_solver"]) == (3, 29, "fixed_point")
    assert 0 < float(row["fwd_steps"]) <= 3


def test_test_f_thres_leaves_training_alone():
    cfg = load_config(REPO / "experiments/imagenet/cls_mdeq_SMALL.yaml", ["TEST.F_THRES", "10"])
    assert eval_f_thres(cfg) == 10 and cfg.DEQ.F_THRES == 26
    assert eval_f_thres(load_config(REPO / "experiments/imagenet/cls_mdeq_SMALL.yaml", [])) == 26


def test_bad_input(tree, tmp_path):
    # class folders (the zoo recipe's default is recordIO)
    out = ["--save-path", tmp_path / "out", "DEVICE", "cpu", "DATASET.DATA_FORMAT", "jpg"]
    (tmp_path / "flat" / "a").mkdir(parents=True)
    assert_one_line_error(run_mdeq("--data", tmp_path / "flat", *out), "no train folder", str(tmp_path / "flat"))
    (tmp_path / "hollow" / "train" / "dog").mkdir(parents=True)
    (tmp_path / "hollow" / "val").mkdir()
    assert_one_line_error(run_mdeq("--data", tmp_path / "hollow", *out), "class folders with images")
    assert_one_line_error(run_mdeq("--data", tree, "--nproc-per-node", 2), "unknown flag --nproc-per-node")
    assert_one_line_error(run_mdeq("--eval", "--data", tree), "--eval needs --resume")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    (["--nproc_per_node", "abc"], "--nproc_per_node expects a whole number >= 1, got 'abc'"),
    (["--nproc_per_node", "0"], "--nproc_per_node expects a whole number >= 1, got '0'"),
    (["--nproc_per_node", "99999999999999999999"], "--nproc_per_node expects a whole number >= 1"),
    (["--nnodes", "2x"], "--nnodes expects a whole number >= 1, got '2x'"),
    (["--node_rank", "-1"], "--node_rank expects a whole number >= 0, got '-1'"),
    (["--nnodes", "2", "--node_rank", "2", "--rdzv_endpoint", "h:1"], "--node_rank 2 must be below --nnodes 2"),
])
def test_bad_numeric_launch_flags(tree, tmp_path, flags, message):
    """Refused before anything starts (bash's own test used to warn and fall back to one process, exit 0)."""
    proc = run_mdeq("--data", tree, "--save-path", tmp_path / "out", "DEVICE", "cpu", *flags)
    assert_one_line_error(proc, f"error: run_mdeq.sh: {message}")
    assert proc.stdout == "" and not (tmp_path / "out").exists()


BLOCK_DALI = """
import sys
class _NoDali:  # this interpreter behaves as if NVIDIA DALI were not installed
    def find_spec(self, name, path=None, target=None):
        if name == "nvidia.dali" or name.startswith("nvidia.dali."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _NoDali())
"""


@needs_compat
def test_bad_recordio_and_missing_dali(tree, tmp_path):
    from make_recordio import make_recordio

    data = tmp_path / "rec"
    for split in ("train", "val"):
        make_recordio(tree / split, data / split, progress=False)
    evaluate = ["--eval", "--rec", "--data", data, *MINI4, "--dali-cpu", "DEVICE", "cpu"]
    rec = (data / "val.rec").read_bytes()
    (data / "val.rec").write_bytes(rec[:-64])
    assert_one_line_error(run_mdeq(*evaluate), "truncated", str(data / "val.rec"))
    (data / "val.idx").unlink()
    assert_one_line_error(run_mdeq(*evaluate), "has no index", str(data / "val.idx"))
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCK_DALI)
    no_dali = {"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "site"), os.environ.get("PYTHONPATH")]))}
    proc = run_mdeq("--eval", "--data", tree, *MINI4, "--loader", "dali", "DEVICE", "cpu", env_extra=no_dali)
    assert_one_line_error(proc, "DATASET.LOADER dali", "NVIDIA DALI is not installed", "pip install -e '.[dali]'")
    proc = run_mdeq("--eval", "--data", tree, *MINI4, "DEVICE", "cpu", env_extra=no_dali)  # auto: torchvision
    assert proc.returncode == 0 and "using torchvision loaders" in proc.stderr and "(29 samples)" in proc.stdout


@pytest.fixture(autouse=True)
def _tools_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "tools"))
