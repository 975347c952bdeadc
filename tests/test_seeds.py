"""Seed-aware runs (the "test like you train" stability study): every seed's files live side by side."""
import csv
import sys

import torch

from deqlab.checkpoint import load_checkpoint
from test_cli import run, tool

from conftest import REPO

STUDY = ["TRAIN.ALL_UNROLLED", "False", "DEQ.F_EPS", "0.0000001", "DEQ.F_THRES", "6", "DEQ.RAND_F_THRES_DELTA", "0",
         "CUDNN.BENCHMARK", "False", "CUDNN.DETERMINISTIC", "True"]


def test_two_seeds_share_an_output_dir_resume_their_own_run_and_evaluate_with_seed(tiny_run):
    path, overrides, tmp = tiny_run
    out_dir = tmp / "stability" / "ift_18"
    run_dir = out_dir / "fashion_mnist" / path.stem
    train = tool("cls_train.py") + ["--cfg", str(path)]
    common = overrides + STUDY + ["OUTPUT_DIR", str(out_dir)]

    # Seed 1 stops after one epoch; seed 2 runs to the end; then seed 1 resumes its own checkpoint.
    proc = run(train + ["--seed", "1", *common, "TRAIN.END_EPOCH", "1"], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_checkpoint(run_dir / "checkpoint_seed1.pth")["epoch"] == 1
    proc = run(train + ["--seed", "2", *common, "TRAIN.RESUME", "True"], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no checkpoint at" in proc.stdout + proc.stderr  # seed 2 does not pick up seed 1's checkpoint
    seed2_files = {p.name: p.read_bytes() for p in run_dir.glob("*seed2*")}
    proc = run(train + ["--seed", "1", *common, "TRAIN.RESUME", "True"], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "checkpoint_seed1.pth at epoch 1" in proc.stdout

    names = {p.name for p in run_dir.iterdir()}
    for seed in (1, 2):
        assert {f"final_state_seed{seed}.pth.tar", f"checkpoint_seed{seed}.pth", f"model_best_seed{seed}.pth",
                f"config_seed{seed}.yaml", f"train_seed{seed}.log"} <= names
        assert (tmp / "log" / "fashion_mnist" / path.stem / f"seed{seed}").is_dir()
    assert not {"final_state.pth", "checkpoint.pth", "config.yaml"} & names
    assert {p.name: p.read_bytes() for p in run_dir.glob("*seed2*")} == seed2_files  # untouched by seed 1
    w1 = load_checkpoint(run_dir / "final_state_seed1.pth.tar")["model"]
    w2 = load_checkpoint(run_dir / "final_state_seed2.pth.tar")["model"]
    assert load_checkpoint(run_dir / "checkpoint_seed1.pth")["epoch"] == 2
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)  # different seeds, different runs

    results = tmp / "stability_results.csv"
    for seed in (1, 2):
        for f_thres in (2, 6):
            proc = run(tool("cls_valid.py") + [
                "--cfg", str(path), "--results_name", str(results), "--seed", str(seed), *overrides,
                "TEST.MODEL_FILE", str(run_dir / f"final_state_seed{seed}.pth.tar"),
                "DEQ.RAND_F_THRES_DELTA", "0", "DEQ.F_EPS", "0.0000001", "DEQ.F_THRES", str(f_thres)], tmp)
            assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(results.open()))
    assert [(int(r["seed"]), int(r["f_thres"])) for r in rows] == [(1, 2), (1, 6), (2, 2), (2, 6)]
    proc = run([sys.executable, str(REPO / "tools/plot_sweep.py"), str(results)], tmp)
    assert proc.returncode == 0 and (tmp / "stability_results.png").is_file(), proc.stderr[-3000:]
