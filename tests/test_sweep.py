"""tools/sweep.py (one checkpoint, several test-time budgets, one CSV row each, for every task) and
tools/plot_sweep.py (lines per method or checkpoint, mean ± std bands, PNG/PDF, table)."""
import csv
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

from deqlab.checkpoint import save_checkpoint
from deqlab.config import load_config
from deqlab.errors import ConfigError
from deqlab.tasks import get_task
from deqlab.utils.sweep import group_sweep, plot_sweep, read_rows, sweep_table

from conftest import COMPAT, REPO, in_tmp, needs_compat

spec = importlib.util.spec_from_file_location("sweep_tool", REPO / "tools" / "sweep.py")
sweep_tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep_tool)


def checkpoint(cfg_path, overrides, task, path):
    """The untrained model of ``cfg_path`` (seeded), saved as a checkpoint at ``path``."""
    cfg = load_config(cfg_path, overrides)
    torch.manual_seed(0)
    save_checkpoint(path, {"model": get_task(task, cfg).build_model().state_dict()})
    return path


def rows_of(path):
    return list(csv.DictReader(path.open()))


def test_cls_sweep_writes_one_row_per_budget(tiny_run):
    path, overrides, tmp = tiny_run
    ckpt = checkpoint(path, overrides, "cls", tmp / "run" / "final_state_seed4.pth.tar")
    out = tmp / "sweep.csv"
    common = ["--cfg", str(path), "--checkpoint", str(ckpt), "--results_name", str(out)]
    rows = sweep_tool.main(common + ["--f_thres", "1", "3", "DEQ.F_EPS", "1e-9", *overrides])
    assert [r["f_thres"] for r in rows] == [1, 3]
    written = rows_of(out)
    assert [int(r["f_thres"]) for r in written] == [1, 3] and all(int(r["count"]) == 16 for r in written)
    assert [float(r["fwd_steps"]) for r in written] == [1.0, 3.0]  # F_EPS 1e-9: every budget is spent
    assert float(written[1]["fwd_residual"]) < float(written[0]["fwd_residual"])
    assert all(r["perf"] == r["top1"] and r["checkpoint"] == str(ckpt) and r["split"] == "test" for r in written)
    # the loss as the performance, on the train split (48 images), through the command line
    proc = subprocess.run([sys.executable, str(REPO / "tools/sweep.py"), *common, "--use_loss_as_perf", "--on_train",
                           "--f_thres", "2", *overrides], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "F_THRES   2: train loss" in proc.stdout
    last = rows_of(out)[-1]
    assert last["split"] == "train" and int(last["count"]) == 48 and last["perf"] == last["loss"]
    assert read_rows(out)[0][0].seed == "4"  # the seed of the trained run, from the file name


def test_skipreg_sweep_counts_the_initial_f_evaluation(tiny_run):
    path, overrides, tmp = tiny_run
    overrides = overrides + ["MODEL.SKIP", "skipreg"]
    ckpt = checkpoint(path, overrides, "cls", tmp / "skipreg.pth")
    rows = sweep_tool.main(["--cfg", str(path), "--checkpoint", str(ckpt), "--f_thres", "2", "DEQ.F_EPS", "1e-9",
                            *overrides])
    assert rows[0]["fwd_steps"] == 3.0


def test_seg_sweep_writes_one_row_per_budget(tiny_seg_run):
    path, overrides, tmp = tiny_seg_run
    ckpt = checkpoint(path, overrides, "seg", tmp / "seg.pth")
    out = tmp / "seg_sweep.csv"
    sweep_tool.main(["--cfg", str(path), "--task", "seg", "--checkpoint", str(ckpt), "--results_name", str(out),
                     "--f_thres", "1", "4", "DEQ.F_EPS", "1e-9", *overrides])
    written = rows_of(out)
    assert [int(r["f_thres"]) for r in written] == [1, 4] and all(int(r["count"]) == 4 for r in written)
    assert [float(r["fwd_steps"]) for r in written] == [1.0, 4.0]
    assert all(r["perf"] == r["miou"] and 0 <= float(r["miou"]) <= 100 for r in written)
    assert read_rows(out)[1] == "mIoU (%)"


@needs_compat
def test_lm_sweep_writes_one_row_per_budget(tmp_path):
    from test_lm_engine import CFG, LM_TINY
    shutil.copytree(COMPAT / "deq_transformer" / "corpus", tmp_path / "data" / "austen")
    overrides = in_tmp(LM_TINY, tmp_path)
    ckpt = checkpoint(CFG, overrides, "lm", tmp_path / "lm.pth")
    out = tmp_path / "lm_sweep.csv"
    sweep_tool.main(["--cfg", str(CFG), "--task", "lm", "--checkpoint", str(ckpt), "--results_name", str(out),
                     "--f_thres", "2", "4", *overrides])
    written = rows_of(out)
    assert [int(r["f_thres"]) for r in written] == [2, 4]
    assert all(r["perf"] == r["ppl"] and float(r["ppl"]) > 1 for r in written)
    assert [float(r["fwd_steps"]) for r in written] == [2.0, 4.0]  # F_EPS 1e-9 in LM_TINY
    assert read_rows(out)[1] == "perplexity"


def test_sweep_refuses_a_missing_checkpoint_and_bad_budgets(tiny_run):
    path, overrides, _ = tiny_run
    # one-line errors (run_tool prints them, exit 2)
    with pytest.raises(ConfigError, match=r"--checkpoint \(or TEST.MODEL_FILE\) is required"):
        sweep_tool.main(["--cfg", str(path), "--f_thres", "2", *overrides])
    with pytest.raises(ConfigError, match="budgets must be >= 1"):
        sweep_tool.main(["--cfg", str(path), "--checkpoint", "x.pth", "--f_thres", "0", *overrides])
    assert sweep_tool.split_budgets(["1", "8", "DEQ.F_EPS", "1e-3"]) == ([1, 8], ["DEQ.F_EPS", "1e-3"])


def grouped_csv(path):
    """Two methods x two seeds x three budgets; method ift: perf = 80 + t + 4 * seed, residual 0.1 * seed / t."""
    lines = ["config,checkpoint,split,seed,f_solver,f_thres,f_eps,perf,top1,fwd_steps,fwd_residual,count"]
    for method, base in (("ift_18", 80.0), ("unrolled_18", 60.0)):
        for seed in (1, 2):
            for t in (1, 4, 16):
                perf = base + t + 4 * seed
                lines.append(f"c.yaml,study/{method}/fashion_mnist/q/final_state_seed{seed}.pth.tar,test,0,anderson,"
                             f"{t},1e-07,{perf},{perf},{t},{0.1 * seed / t},100")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_plot_sweep_draws_one_line_per_group_with_std_bands(tmp_path):
    rows, label = read_rows(grouped_csv(tmp_path / "study.csv"))
    fig = plot_sweep(rows, label, group_by="method")
    ax_perf, ax_res = fig.axes
    assert len(ax_perf.get_lines()) == 2 and len(ax_res.get_lines()) == 2
    assert sorted(t.get_text() for t in ax_perf.get_legend().get_texts()) == ["ift_18 (2 seeds)",
                                                                              "unrolled_18 (2 seeds)"]
    assert ax_perf.get_ylabel() == "top-1 accuracy (%)" and ax_res.get_yscale() == "log"
    ift = next(line for line in ax_perf.get_lines() if line.get_label().startswith("ift"))
    assert list(ift.get_xdata()) == [1, 4, 16] and list(ift.get_ydata()) == pytest.approx([87.0, 90.0, 102.0])
    # the band is mean ± sample std (std of {x, x + 4} = 2.83)
    band = ax_perf.collections[[line.get_label() for line in ax_perf.get_lines()].index(ift.get_label())]
    ys = band.get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(87.0 - 8 ** 0.5) and ys.max() == pytest.approx(102.0 + 8 ** 0.5)
    per_ckpt = plot_sweep(rows, label, group_by="checkpoint")
    assert len(per_ckpt.axes[0].get_lines()) == 4 and not per_ckpt.axes[0].collections  # one seed each: no band
    minmax = plot_sweep(rows, label, band="minmax").axes[0].collections[0].get_paths()[0].vertices[:, 1]
    assert (minmax.min(), minmax.max()) == (85.0, 104.0)  # ift (drawn first): 80 + 1 + 4 .. 80 + 16 + 8
    assert len(group_sweep(rows, "checkpoint")) == 4 and len(group_sweep(rows)) == 2
    table = sweep_table(rows, label)
    assert "| ift_18 | 4 | 90.00 ± 2.83 |" in table and table.count("\n") == 2 + 6


def test_plot_sweep_cli_writes_png_pdf_and_table(tmp_path):
    csv_path = grouped_csv(tmp_path / "study.csv")
    proc = subprocess.run([sys.executable, str(REPO / "tools/plot_sweep.py"), str(csv_path), "--group-by", "method",
                           "--out", str(tmp_path / "fig.png"), "--pdf", "--table", str(tmp_path / "t.md")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from PIL import Image
    assert Image.open(tmp_path / "fig.png").size == (1200, 480)
    assert (tmp_path / "fig.pdf").read_bytes()[:4] == b"%PDF"
    assert "unrolled_18" in (tmp_path / "t.md").read_text()
