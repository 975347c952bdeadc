"""tools/plot_run.py: the series read from a real short run's tensorboard events equal the numbers its
train.log prints, two seeds are drawn as their mean, and the figure has the five panels."""
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import COMPAT, REPO, in_tmp, needs_compat
from deqlab.errors import DatasetError
from deqlab.utils.run_plot import PANELS, plot_run, read_run

pytestmark = [needs_compat, pytest.mark.timeout(400), pytest.mark.xdist_group("plot_run")]
RUN = "austen/deq_transformer_quickstart"


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    """Two seeds of a 6-step tiny language-model run (validation at steps 3 and 6) sharing one OUTPUT_DIR."""
    from test_lm_engine import CFG, LM_TINY
    tmp = tmp_path_factory.mktemp("plot_run")
    shutil.copytree(COMPAT / "deq_transformer" / "corpus", tmp / "data" / "austen")
    overrides = in_tmp(LM_TINY, tmp)
    for seed in ("1", "2"):  # the real tool: it also writes train_seedN.log
        run = subprocess.run([sys.executable, str(REPO / "tools/lm_train.py"), "--seed", seed, "--cfg", str(CFG),
                              *overrides], capture_output=True, text=True, cwd=tmp)
        assert run.returncode == 0, run.stderr[-2000:]
    return tmp, overrides, CFG


def log_numbers(log_text: str) -> dict[str, list[float]]:
    """step, test ppl and the validation's f evaluations of every validation line of a train.log."""
    rows = re.findall(r"step (\d+) .*\| +test loss [\d.]+ ppl ([\d.]+) .*f evals ([\d.]+)", log_text)
    return {"step": [float(r[0]) for r in rows], "ppl": [float(r[1]) for r in rows],
            "nfe": [float(r[2]) for r in rows]}


def test_series_equal_the_train_log_and_the_figure_draws_the_seed_mean(two_seeds):
    tmp, _, _ = two_seeds
    runs = read_run(tmp / "log" / RUN)
    assert len(runs) == 2
    for seed, series in zip((1, 2), runs):
        logged = log_numbers((tmp / "out" / RUN / f"train_seed{seed}.log").read_text())
        assert logged["step"] == [3.0, 6.0] == sorted(series["valid/ppl"])
        assert [round(series["valid/ppl"][s], 2) for s in (3, 6)] == pytest.approx(logged["ppl"], abs=0.0051)
        assert [round(series["valid/fwd_nfe"][s], 1) for s in (3, 6)] == pytest.approx(logged["nfe"], abs=0.051)
        assert sorted(series["train/lr"]) == list(range(1, 7))  # PRINT_FREQ 1: every training step
        assert list(series["train/lr"].values()) == pytest.approx([0.002] * 6)  # TRAIN.LR, constant (float32)
    fig = plot_run(runs)
    assert [ax.get_title() for ax in fig.axes] == [name for name, _, _ in PANELS]
    metric = {line.get_label(): line for line in fig.axes[1].get_lines()}
    ppl = metric["valid/ppl (mean of 2 seeds)"]
    assert list(ppl.get_xdata()) == [3, 6]
    assert np.allclose(ppl.get_ydata(), [(runs[0]["valid/ppl"][s] + runs[1]["valid/ppl"][s]) / 2 for s in (3, 6)])
    assert fig.axes[3].get_yscale() == "log"


def test_plot_run_tool_writes_the_png_beside_the_checkpoints(two_seeds):
    tmp, overrides, cfg = two_seeds
    out = subprocess.run([sys.executable, str(REPO / "tools/plot_run.py"), "--cfg", str(cfg), *overrides],
                         capture_output=True, text=True, cwd=tmp)
    assert out.returncode == 0, out.stderr
    png = tmp / "out" / RUN / "curves.png"
    assert out.stdout.strip() == f"wrote {png}"
    assert Image.open(png).size == (int(4.2 * 5 * 110), int(3.4 * 110))
    bad = subprocess.run([sys.executable, str(REPO / "tools/plot_run.py"), str(tmp / "nowhere")],
                         capture_output=True, text=True, cwd=tmp)
    assert bad.returncode == 2 and bad.stderr.strip().endswith("no such tensorboard folder (LOG_DIR/<dataset>/"
                                                                "<config name> of a run)")


def test_an_empty_folder_is_one_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="no tensorboard scalars"):
        read_run(tmp_path)
