"""Faults, from the user's side: a diverging run stops with one line and saves nothing non-finite; a resume from
the wrong file, a failed rerun, a bad output path or a CSV of other rows is refused in one line before anything
is written. Each case runs a tool's main with its command line and compares the sha256 of every file of the
run (checkpoints, config, log, tensorboard events) before and after."""
import csv
import hashlib
import importlib.util
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from deqlab.checkpoint import load_checkpoint, nonfinite_tensors, save_checkpoint
from deqlab.engine.cli import run_tool
from deqlab.engine import launch
from deqlab.config import load_config
from deqlab.engine import Trainer
from deqlab.engine.divergence import TrainingDiverged
from deqlab.tasks.classification import ClassificationTask
from deqlab.tasks.language_model import LanguageModelTask

from conftest import COMPAT, REPO, SEG_TINY_OVERRIDES, TINY_OVERRIDES, in_tmp, needs_compat, write_fashion_mnist, \
    write_seg_tree
from test_lm_engine import CFG as LM_CFG, LM_TINY

pytestmark = [pytest.mark.timeout(600), pytest.mark.xdist_group("faults")]
CLS_CFG = REPO / "experiments/fashion_mnist/cls_mdeq_quickstart.yaml"
SEG_CFG = REPO / "experiments/cityscapes/seg_mdeq_SMALL.yaml"
# From the second epoch on the learning rate is 1e30 times the first epoch's: epoch 1 checkpoints, epoch 2 diverges.
HUGE_FROM_EPOCH_2 = ["TRAIN.LR_SCHEDULER", "step", "TRAIN.LR_STEP", "[1]", "TRAIN.LR_FACTOR", "1e30"]


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


seg_test_tool, sweep_tool = load_tool("seg_test"), load_tool("sweep")


def call(capsys, main):
    """Run a tool's ``main`` as the tool does (``run_tool``): (exit code, the stderr lines that are errors,
    stdout)."""
    capsys.readouterr()
    try:
        run_tool(main)
        code = 0
    except SystemExit as end:
        code = end.code
    out, err = capsys.readouterr()
    err = err.replace("\r", "\n")
    assert "Traceback" not in err, err
    return code, [line for line in err.splitlines() if "error" in line], out


def assert_refused(result, *fragments):
    code, errors, _ = result
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error: "), result
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def hashes(*folders):
    """sha256 of every file under ``folders``."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for folder in folders
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def assert_all_finite(folder):
    """Every checkpoint under ``folder`` holds only finite tensors; returns their names."""
    files = sorted(p for p in Path(folder).rglob("*.pth*"))
    for path in files:
        bad, total = nonfinite_tensors(load_checkpoint(path))
        assert total and not bad, (path, bad)
    return {p.name for p in files}


def diverged_step(line):
    return int(re.search(r"training diverged at step (\d+): ", line).group(1))


@pytest.mark.parametrize("task", ["cls", "seg"])
def test_divergence_stops_and_keeps_the_last_finite_checkpoint(task, tmp_path, capsys):
    if task == "cls":
        write_fashion_mnist(tmp_path / "data")
        cfg, overrides, steps_per_epoch = CLS_CFG, in_tmp(TINY_OVERRIDES, tmp_path), 3
        run = tmp_path / "out" / "fashion_mnist" / "cls_mdeq_quickstart"
    else:
        write_seg_tree(tmp_path / "data")
        cfg, overrides, steps_per_epoch = SEG_CFG, in_tmp(SEG_TINY_OVERRIDES, tmp_path), 2
        run = tmp_path / "out" / "cityscapes" / "seg_mdeq_SMALL"
    argv = ["--cfg", str(cfg), *overrides, *HUGE_FROM_EPOCH_2, "TRAIN.END_EPOCH", "3", "TRAIN.RESUME", "False"]
    line = assert_refused(call(capsys, lambda: launch.train_main(task, "train", argv)), "holds the last finite state")
    assert diverged_step(line) > steps_per_epoch  # in epoch 2, where the learning rate is huge
    assert assert_all_finite(run) == {"checkpoint.pth", "model_best.pth"}  # no final_state.pth
    assert load_checkpoint(run / "checkpoint.pth")["step"] == steps_per_epoch  # epoch 1's, as it was


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    """A finished one-epoch segmentation run, its tool command line and folders."""
    tmp = tmp_path_factory.mktemp("seg")
    write_seg_tree(tmp / "data")
    argv = ["--cfg", str(SEG_CFG), *in_tmp(SEG_TINY_OVERRIDES, tmp), "TRAIN.END_EPOCH", "1"]
    launch.train_main("seg", "train", argv + ["TRAIN.RESUME", "False"])
    return argv, tmp, tmp / "out" / "cityscapes" / "seg_mdeq_SMALL"


def test_failed_reruns_and_wrong_resume_files_leave_the_run_as_it_was(seg_run, tmp_path, capsys):
    argv, tmp, run = seg_run
    before = hashes(tmp / "out", tmp / "log")
    assert {Path(p).name for p in before} >= {"config.yaml", "train.log", "checkpoint.pth", "final_state.pth"}

    def train(*extra, task="seg", args=argv):
        return call(capsys, lambda: launch.train_main(task, "train", args + list(extra)))

    # a value that fails at the first batch, as a new run and as a resume of the good one
    assert_refused(train("DATASET.NUM_CLASSES", "5", "TRAIN.RESUME", "False"), "DATASET.NUM_CLASSES=5")
    assert_refused(train("DATASET.NUM_CLASSES", "5", "TRAIN.RESUME", "True"), "does not fit this model",
                   "last_layer.3.weight")
    # a weights-only file, and another task's resume checkpoint
    assert_refused(train("TRAIN.RESUME_FILE", str(run / "final_state.pth")), "is not a resume checkpoint",
                   "TRAIN.MODEL_FILE")
    write_fashion_mnist(tmp_path / "data")
    cls_argv = ["--cfg", str(CLS_CFG), *in_tmp(TINY_OVERRIDES, tmp_path)]
    assert_refused(train("TRAIN.RESUME_FILE", str(run / "checkpoint.pth"), task="cls", args=cls_argv),
                   "does not fit this model")
    assert not (tmp_path / "out").exists() and not (tmp_path / "log").exists()
    # a new run that diverges at once (SGD at a huge learning rate) into the good run's folder
    line = assert_refused(train("TRAIN.RESUME", "False", "TRAIN.OPTIMIZER", "sgd", "TRAIN.LR", "1e30"),
                          "is as it was")
    assert diverged_step(line) <= 2
    assert hashes(tmp / "out", tmp / "log") == before


def test_non_finite_models_and_bad_outputs_are_refused_before_the_evaluation(seg_run, tmp_path, capsys):
    argv, tmp, run = seg_run
    good = run / "final_state.pth"
    state = load_checkpoint(good)

    def evaluate(model_file, *flags):
        return call(capsys, lambda: launch.test_main("seg", "test", [*flags, *argv, "TEST.MODEL_FILE", str(model_file)],
                                              add_arguments=seg_test_tool.add_arguments,
                                              batch_hook=seg_test_tool.prediction_saver))

    nan_model = tmp_path / "nan.pth"
    state["model"]["last_layer.3.bias"][0] = math.nan
    save_checkpoint(nan_model, state)
    assert_refused(evaluate(nan_model), "holds a diverged model", "1 of", "last_layer.3.bias")
    # finite weights whose forward overflows: the evaluation is non-finite, no metric is printed
    state["model"] = {k: v * 1e30 if k.startswith("last_layer.3.") else v
                      for k, v in load_checkpoint(good)["model"].items()}
    huge_model = tmp_path / "huge.pth"
    save_checkpoint(huge_model, state)
    result = evaluate(huge_model)
    assert_refused(result, "gave loss")
    assert "mIoU" not in result[2] and "mIoU" in evaluate(good)[2]

    a_file, a_folder = tmp_path / "preds.png", tmp_path / "rows"
    a_file.write_bytes(b"not a folder")
    a_folder.mkdir()
    before = hashes(tmp_path, run)
    assert_refused(evaluate(good, "--save_pred", str(a_file)), "--save_pred", "is a file")
    assert_refused(evaluate(good, "--results_name", str(a_folder)), "--results_name", "is a folder")
    assert_refused(evaluate(good, "--results_name", str(a_file / "rows.csv")), "is a file, not a folder")
    assert hashes(tmp_path, run) == before


@needs_compat
def test_lm_divergence_perplexity_and_a_csv_of_other_rows(seg_run, tmp_path, capsys):
    shutil.copytree(COMPAT / "deq_transformer" / "corpus", tmp_path / "data" / "austen")
    argv = ["--cfg", str(LM_CFG), *in_tmp(LM_TINY, tmp_path), "TRAIN.MAX_STEP", "3"]
    assert call(capsys, lambda: launch.train_main("lm", "train", argv))[:2] == (0, [])
    before = hashes(tmp_path / "out", tmp_path / "log")
    line = assert_refused(call(capsys, lambda: launch.train_main("lm", "train", argv + ["TRAIN.OPTIMIZER", "sgd",
                                                                              "TRAIN.LR", "1e30"])), "is as it was")
    assert diverged_step(line) <= 2 and hashes(tmp_path / "out", tmp_path / "log") == before
    assert_all_finite(tmp_path / "out")

    # rows of a segmentation evaluation, then a language-model sweep into the same file
    seg_argv, _, seg_dir = seg_run
    rows = tmp_path / "rows.csv"
    seg_model = str(seg_dir / "final_state.pth")
    assert call(capsys, lambda: launch.test_main("seg", "test", ["--results_name", str(rows), *seg_argv,
                                                                 "TEST.MODEL_FILE", seg_model]))[0] == 0
    written = rows.read_bytes()
    model = tmp_path / "out" / "austen" / "deq_transformer_quickstart" / "final_state.pth"
    line = assert_refused(call(capsys, lambda: sweep_tool.main(["--task", "lm", "--checkpoint", str(model),
                                                                "--results_name", str(rows), *argv])),
                          "holds rows of another kind", "append to a new file")
    assert "ppl" in line and "miou" in line  # the columns that differ, both ways
    assert rows.read_bytes() == written and len(list(csv.reader(rows.open()))) == 2


def test_perplexity_of_a_diverged_loss_is_printed_short():
    task = LanguageModelTask(load_config(LM_CFG))
    meter, texts = task.new_meter(torch.device("cpu")), []
    for mean_nll in (6e9, 700.0, 5.0):  # per token, over 64 tokens
        meter.sums = torch.tensor([mean_nll * 64, 64.0], dtype=torch.float64)
        texts.append(task.describe({**meter.result(), "loss": mean_nll}))
    assert texts == ["loss 6000000000.0000 ppl inf (64 tokens)", f"loss 700.0000 ppl {math.exp(700):.3e} (64 tokens)",
                     f"loss 5.0000 ppl {math.exp(5):.2f} (64 tokens)"]


class BadBatches(ClassificationTask):
    """Classification whose training loss is NaN at the given (1-based) training steps: a bad batch."""

    def __init__(self, cfg, bad_steps):
        super().__init__(cfg)
        self.bad_steps, self.steps = set(bad_steps), 0

    def forward(self, net, x, **kwargs):
        self.steps += 1
        return super().forward(net, x, **kwargs)

    def loss(self, output, target):
        loss = super().loss(output, target)
        return loss * math.nan if torch.is_grad_enabled() and self.steps in self.bad_steps else loss


def test_skip_mode_drops_non_finite_steps_up_to_the_bound(tiny_run):
    path, overrides, tmp = tiny_run
    overrides = overrides + ["TRAIN.LR_SCHEDULER", "constant", "TRAIN.PRECISE_BN_BATCHES", "0",
                             "TRAIN.NONFINITE", "skip", "TRAIN.NONFINITE_MAX_SKIPS", "2"]

    def fit(name, bad_steps, max_step, *extra):
        cfg = load_config(path, overrides + ["OUTPUT_DIR", str(tmp / name), "TRAIN.MAX_STEP", str(max_step), *extra])
        trainer = Trainer(cfg, path, task=BadBatches(cfg, bad_steps))
        trainer.fit()
        return load_checkpoint(trainer.files.final)["model"]

    # steps 2 and 3 skipped: the weights and BatchNorm statistics are those after step 1
    skipped, one_step = fit("skipped", {2, 3}, 3), fit("one_step", set(), 1)
    assert [k for k in one_step if not torch.equal(skipped[k], one_step[k])] == []
    with pytest.raises(TrainingDiverged, match=r"at step 4: the loss is nan \(after 2 steps skipped in a row"):
        fit("bound", {2, 3, 4}, 4)
    with pytest.raises(TrainingDiverged, match=r"at step 2: the loss is nan; nothing was saved"):
        fit("stop", {2}, 3, "TRAIN.NONFINITE", "stop")
    assert load_checkpoint(tmp / "bound" / "fashion_mnist" / "cls_mdeq_quickstart" / "checkpoint.pth")["step"] == 3
    assert not (tmp / "stop").exists()  # stopped at its second step: nothing written
