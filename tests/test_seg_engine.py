"""Segmentation on the shared engine: exact resume, DDP equivalence, seg_train/seg_test as users run them."""
import csv
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from deqlab.checkpoint import load_checkpoint
from deqlab.config import load_config
from deqlab.engine import Trainer
from deqlab.tasks import get_task
from deqlab.utils.dist import DistInfo
from test_cli import assert_one_line_error, run, tool
from test_seg_data import _break

from conftest import ddp_reference

OUT = "out/cityscapes/seg_mdeq_SMALL"


def test_resumed_seg_run_ends_like_an_uninterrupted_one(tiny_seg_run):
    path, overrides, tmp = tiny_seg_run
    overrides = overrides + ["TRAIN.MULTI_SCALE", "True", "TRAIN.RESUME", "False"]  # random scale, crop, flip
    full = Trainer(load_config(path, overrides + ["OUTPUT_DIR", str(tmp / "full")]), path, task="seg")
    full_metrics = full.fit()
    first = Trainer(load_config(path, overrides + ["OUTPUT_DIR", str(tmp / "cut")]), path, task="seg")
    first.fit(stop_after=1)
    resumed = Trainer(load_config(path, overrides + ["OUTPUT_DIR", str(tmp / "cut"), "TRAIN.RESUME", "True"]), path,
                      task="seg")
    resumed_metrics = resumed.fit()
    assert resumed.step == full.step == 2 * 2
    per_class = [torch.tensor(m.pop("per_class_iou")) for m in (full_metrics, resumed_metrics)]
    assert resumed_metrics == full_metrics and torch.equal(per_class[0].isnan(), per_class[1].isnan())
    assert torch.equal(per_class[0].nan_to_num(-1), per_class[1].nan_to_num(-1)) and len(per_class[0]) == 19
    assert 0 <= full_metrics["miou"] <= 100
    a = load_checkpoint(full.files.final)["model"]
    b = load_checkpoint(resumed.files.final)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def _ddp_worker(rank, init_file, path, overrides):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        Trainer(load_config(path, overrides), path, DistInfo(rank, 2, rank, torch.device("cpu")), task="seg").fit()
    finally:
        dist.destroy_process_group()


def test_two_process_seg_ddp_matches_one_process(tiny_seg_run):
    path, overrides, tmp = tiny_seg_run
    # No random transform, so the reference sees exactly the ranks' batches.
    overrides = overrides + ["TRAIN.END_EPOCH", "1", "TRAIN.BATCH_SIZE_PER_GPU", "2", "TRAIN.FLIP", "False",
                             "TRAIN.RESUME", "False"]
    mp.spawn(_ddp_worker, args=(tempfile.mktemp(dir=tmp), path, overrides), nprocs=2, join=True)
    ddp = load_checkpoint(tmp / OUT / "final_state.pth")["model"]

    model, _ = ddp_reference(load_config(path, overrides), "seg")
    for name, param in model.named_parameters():
        assert torch.allclose(ddp[name], param.detach(), atol=1e-5, rtol=0), name


def test_torchrun_seg_train_then_seg_test_rows_and_predictions(tiny_seg_run):
    path, overrides, tmp = tiny_seg_run
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(tool("seg_train.py")[1]), "--cfg", str(path), *overrides, "TRAIN.END_EPOCH", "1"], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp / OUT / "final_state.pth"
    assert ckpt.is_file() and "mIoU" in (tmp / OUT / "train.log").read_text()
    results, preds = tmp / "cityscapes_n_iter_results.csv", tmp / "preds"
    for f_thres in (2, 6):
        proc = run(tool("seg_test.py") + ["--cfg", str(path), "--results_name", str(results), "--save_pred",
                                          str(preds), *overrides, "TEST.MODEL_FILE", str(ckpt), "TEST.FLIP_TEST", "True",
                                          "DEQ.F_EPS", "1e-7", "DEQ.F_THRES", str(f_thres)], tmp)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "test mIoU (%):" in proc.stdout and "per_class_iou: 0:" in proc.stdout
    rows = list(csv.DictReader(results.open()))
    assert [int(r["f_thres"]) for r in rows] == [2, 6] and all(float(r["f_eps"]) == 1e-7 for r in rows)
    assert all(0 <= float(r["miou"]) <= 100 and r["perf"] == r["miou"] and int(r["count"]) == 4 for r in rows)
    assert float(rows[0]["fwd_nfe"]) <= 2 < float(rows[1]["fwd_nfe"])  # Anderson: budget = f evaluations
    saved = sorted(preds.glob("*.png"))
    assert len(saved) == 4 and Image.open(saved[0]).size == (64, 32) and Image.open(saved[0]).mode == "P"
    assert len(list((preds / "colour").glob("*.png"))) == 4  # label ids above, colours here


def test_bad_seg_input_is_one_line_and_writes_nothing(tiny_seg_run):
    path, overrides, tmp = tiny_seg_run
    train = tool("seg_train.py") + ["--cfg", str(path), *overrides]
    for case in ("column", "size", "image", "list"):  # each breaks the tree a little more
        named = _break(tmp / "data", case)
        assert_one_line_error(run(train, tmp), named)
        assert not (tmp / "out").exists() and not (tmp / "log").exists()


def test_a_checkpoint_with_another_class_count_is_one_line(tiny_seg_run):
    path, overrides, tmp = tiny_seg_run
    other = tmp / "five_classes.pth"
    cfg = load_config(path, overrides + ["DATASET.NUM_CLASSES", "5", "DATASET.LABEL_MAPPING", "none"])
    torch.save(get_task("seg", cfg).build_model().state_dict(), other)
    proc = run(tool("seg_test.py") + ["--cfg", str(path), *overrides, "TEST.MODEL_FILE", str(other)], tmp)
    assert_one_line_error(proc, "does not fit this model", "last_layer.3.weight (5,")
