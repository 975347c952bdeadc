"""The tools as users run them: torchrun / torch.distributed.launch, cls_valid's CSV, one-line errors."""
import csv
import os
import runpy
import subprocess
import sys

import pytest
import torch
from PIL import Image

from deqlab.config import load_config
from deqlab.models import build_model
from deqlab.utils.dist import free_port
from deqlab.utils.sweep import group_sweep, method_labels, read_rows

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
    assert float(rows[0]["fwd_nfe"]) <= 2 < float(rows[1]["fwd_nfe"])  # Anderson: budget = f evaluations
    proc = run([sys.executable, str(REPO / "tools/plot_sweep.py"), str(csv_path)], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Image.open(tmp / "sweep.png").size == (1200, 480)


def stability_csv(path):
    """Two methods x two seeds x three budgets, as cls_valid writes them (seed 2 of jfb at budget 4 run twice)."""
    lines = ["config,checkpoint,split,seed,f_solver,f_thres,perf,top1,fwd_residual"]
    for method, base in (("ift_18", 80.0), ("jfb_18", 60.0)):
        for seed in (1, 2):
            for f_thres in (8, 2, 4):
                perf = base + f_thres + 4 * seed  # seeds 1 and 2: base + f_thres + 4 and + 8
                lines.append(f"c.yaml,stability/{method}/cifar10/cls_mdeq_TINY/final_state_seed{seed}.pth.tar,"
                             f"test,{seed},broyden,{f_thres},{perf},{perf},{0.1 * seed / f_thres}")
    lines.insert(3, "c.yaml,stability/jfb_18/cifar10/cls_mdeq_TINY/final_state_seed2.pth.tar,test,2,broyden,4,0,0,1")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_plot_sweep_groups_rows_by_method_and_seed(tmp_path):
    path = stability_csv(tmp_path / "s.csv")
    rows, ylabel = read_rows(path)
    groups = group_sweep(rows)
    # evaluated without --seed (the seed column is SEED's default): the file name still tells the seeds apart
    path.write_text(path.read_text().replace(",test,1,", ",test,0,").replace(",test,2,", ",test,0,"))
    assert group_sweep(read_rows(path)[0]) == groups
    assert ylabel == "top-1 accuracy (%)"
    assert sorted(method_labels(list(groups)).values()) == ["ift_18", "jfb_18"]
    for method, base in zip(sorted(groups, key=method_labels(list(groups)).get), (80.0, 60.0)):
        perf, residual = groups[method]["perf"], groups[method]["fwd_residual"]
        assert [(s.f_thres, s.seeds, s.low, s.high) for s in perf] == [
            (t, 2, base + t + 4, base + t + 8) for t in (2, 4, 8)]
        assert [s.mean for s in perf] == pytest.approx([base + t + 6 for t in (2, 4, 8)])
        assert [s.std for s in perf] == pytest.approx([8 ** 0.5] * 3)  # sample std of {x, x + 4}
        assert [s.mean for s in residual] == pytest.approx([0.15 / t for t in (2, 4, 8)])
    one = group_sweep([r for r in rows if r.seed == "1"])
    assert all(s.seeds == 1 and s.std == 0 and s.low == s.high == s.mean for g in one.values() for s in g["perf"])


def test_plot_sweep_draws_cls_and_seg_csvs_and_rejects_other_csvs(tmp_path):
    plot = [sys.executable, str(REPO / "tools/plot_sweep.py")]
    proc = run(plot + [str(stability_csv(tmp_path / "s.csv"))], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Image.open(tmp_path / "s.png").size == (1200, 480)
    seg = tmp_path / "seg.csv"  # seg_test.py's columns; a released checkpoint without a seed in its name
    seg.write_text("config,checkpoint,split,seed,f_thres,f_eps,perf,miou,pixel_acc,fwd_steps,fwd_residual\n"
                   "x.yaml,MDEQ_XL_Seg.pkl,test,0,2,1e-07,41.5,41.5,80.1,2,0.3\n"
                   "x.yaml,MDEQ_XL_Seg.pkl,test,0,8,1e-07,70.2,70.2,93.0,8,0.01\n")
    assert read_rows(seg)[1] == "mIoU (%)"
    proc = run(plot + [str(seg), "--out", str(tmp_path / "seg_sweep.png")], tmp_path)
    assert proc.returncode == 0 and (tmp_path / "seg_sweep.png").is_file(), proc.stderr[-3000:]
    bad = tmp_path / "bad.csv"
    bad.write_text("checkpoint,f_thres,perf,fwd_residual\na.pth,8,90.0,0.02\na.pth,many,50.0,0.7\n")
    assert_one_line_error(run(plot + [str(bad)], tmp_path), "bad.csv:3: expected a --results_name row")
    assert not (tmp_path / "bad.png").exists()


def test_the_deprecated_launcher_passes_local_rank_and_works(tiny_run):
    path, overrides, tmp = tiny_run
    proc = run([sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node", "2", "--master_port",
                str(free_port()), str(REPO / "tools/cls_train.py"), "--cfg", str(path), *overrides, "TRAIN.END_EPOCH", "1"],
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


# Every tool that takes KEY VALUE overrides, with its own flags after the pairs (the README's and the seeds'
# lines, with a flag appended); "--percent 2" last proves the flags after the pairs reached the config.
FLAGS_AFTER_PAIRS = {
    "cls_train.py": ["--cfg", "experiments/fashion_mnist/cls_mdeq_quickstart.yaml", "DEQ.F_THRES", "3", "--seed", "1"],
    "cls_valid.py": ["--cfg", "experiments/cifar/cls_mdeq_TINY.yaml", "DEQ.F_THRES", "3", "--use_loss_as_perf",
                     "--results_name", "r.csv", "--valid_on_train", "--testModel", "m.pth"],
    "seg_train.py": ["--cfg", "experiments/fashion_scenes/seg_mdeq_quickstart.yaml", "TRAIN.END_EPOCH", "1",
                     "--modelDir", "out"],
    "seg_test.py": ["--cfg", "experiments/cityscapes/seg_mdeq_SMALL.yaml", "TEST.MULTI_SCALE", "True",
                    "TEST.FLIP_TEST", "True", "--save_pred", "preds/", "--results_file", "r.csv"],
    "lm_train.py": ["--cfg", "experiments/austen/deq_transformer_quickstart.yaml", "TRAIN.MAX_STEP", "2",
                    "--seed", "2"],
    "lm_eval.py": ["--cfg", "experiments/austen/deq_transformer_quickstart.yaml", "DATASET.TEST_SET", "test",
                   "LM.MEM_LEN", "128", "--results_file", "lm_sweep.csv"],
    "sweep.py": ["--cfg", "experiments/cifar/cls_mdeq_TINY.yaml", "DEQ.F_EPS", "1e-6", "--f_thres", "2", "4",
                 "DEQ.F_THRES", "3", "--checkpoint", "c.pth", "--use_loss_as_perf", "--task", "cls"],
    "run_files.py": ["--cfg", "experiments/cifar/cls_mdeq_TINY.yaml", "final", "OUTPUT_DIR", "o", "--seed", "3"],
    "lm_generate.py": ["--cfg", "experiments/austen/deq_transformer_quickstart.yaml", "TEST.MODEL_FILE", "m.pth",
                       "--prompt", "It is a truth", "--tokens", "5", "--top_p", "0.9"],
}
# plot_run.py takes KEY VALUE pairs after --cfg but not the training flags (test_plot_run_flags_anywhere)
NO_OVERRIDES = {"make_austen_corpus.py", "make_recordio.py", "plot_sweep.py", "make_cityscapes_lists.py"}


def test_every_config_tool_is_covered():
    assert {p.name for p in (REPO / "tools").glob("*.py")} == set(FLAGS_AFTER_PAIRS) | NO_OVERRIDES | {"plot_run.py"}


def test_plot_run_flags_anywhere(monkeypatch, capsys):
    """plot_run.py's own flags may come after the pairs, the pairs reach the config, and an unknown flag is named
    (with --cfg or a TB_DIR)."""
    cfg = ["--cfg", "experiments/fashion_mnist/cls_mdeq_quickstart.yaml"]
    assert_one_line_error(run_in_process("plot_run.py", cfg + ["--out", "c.png", "PERCENT", "2"], monkeypatch,
                                         capsys), "PERCENT must be", "got 2")
    assert_one_line_error(run_in_process("plot_run.py", cfg + ["OUTPUT_DIR", "o", "--no_such_flag", "1"],
                                         monkeypatch, capsys), "unknown flag --no_such_flag")
    assert_one_line_error(run_in_process("plot_run.py", ["runs/tb", "--no_such_flag"], monkeypatch, capsys),
                          "unknown flag --no_such_flag")


def run_in_process(name, args, monkeypatch, capsys):
    """Run tools/NAME as ``python tools/NAME args`` would, in this process (a subprocess costs seconds each)."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", [str(REPO / "tools" / name), *args])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / "tools" / name), run_name="__main__")
    return subprocess.CompletedProcess(args, exit_.value.code, *capsys.readouterr())


@pytest.mark.parametrize("name", sorted(FLAGS_AFTER_PAIRS))
def test_flags_after_key_value_pairs(name, monkeypatch, capsys):
    line = FLAGS_AFTER_PAIRS[name]
    assert_one_line_error(run_in_process(name, line + ["--percent", "2"], monkeypatch, capsys),
                          "PERCENT must be", "got 2")
    assert_one_line_error(run_in_process(name, line + ["--no_such_flag", "1"], monkeypatch, capsys),
                          "unknown flag --no_such_flag")


def test_run_files_takes_the_tools_line(tmp_path):
    """tools/run_files.py (the scripts' way to find a run's files and data) reads the line the tools get."""
    cfg = ["--cfg", "experiments/austen/deq_transformer_quickstart.yaml"]
    for name, line, expected in [
        ("data", ["DATASET.ROOT", str(tmp_path / "corpus"), "--seed", "2"], tmp_path / "corpus" / "austen"),
        ("final", ["OUTPUT_DIR", str(tmp_path), "--seed", "2"],
         tmp_path / "austen" / "deq_transformer_quickstart" / "final_state_seed2.pth.tar"),
        ("final", ["OUTPUT_DIR", str(tmp_path), "SEED", "4"],  # keyed by the seed, as the trainer keys it
         tmp_path / "austen" / "deq_transformer_quickstart" / "final_state_seed4.pth.tar")]:
        proc = run(tool("run_files.py") + cfg + [name, *line], tmp_path)
        assert proc.returncode == 0 and proc.stdout.strip() == str(expected), proc.stderr[-2000:]
