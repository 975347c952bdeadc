"""scripts/stability_study.sh end to end on a tiny Fashion-MNIST: seeds x {ift, unrolled} trained, swept and
plotted; a second call reuses the trained runs."""
import csv

from deqlab.config import load_config
from deqlab.utils.sweep import plot_sweep, read_rows
from test_cli import run

from conftest import REPO


def test_the_study_trains_sweeps_and_plots_every_seed_and_method(tiny_run):
    path, overrides, tmp = tiny_run
    out = tmp / "study"
    # DEQ.GRAD ift and DEQ.F_THRES 6 in the tiny overrides must not override the study's methods and budget
    cmd = ["bash", str(REPO / "scripts/stability_study.sh"), "--seeds", "2", "--budgets", "1 3", "--train_f_thres", "3",
           "--out", str(out), *overrides]
    proc = run(cmd, tmp, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((out / "stability_results.csv").open()))
    seen = {(r["checkpoint"].split("/study/")[1].split("/")[0], r["seed"], int(r["f_thres"])) for r in rows}
    assert len(rows) == 8 and seen == {(m, s, t) for m in ("ift_3", "unrolled_3") for s in ("0", "1") for t in (1, 3)}
    assert all(float(r["fwd_nfe"]) == int(r["f_thres"]) for r in rows)  # F_EPS 1e-7: every (Anderson) budget spent
    for method, grad in (("ift_3", "ift"), ("unrolled_3", "unrolled")):
        for seed in (0, 1):
            cfg = load_config(out / method / "fashion_mnist" / path.stem / f"config_seed{seed}.yaml")
            assert (cfg.DEQ.GRAD, cfg.DEQ.F_THRES, cfg.SEED, cfg.DEQ.F_EPS) == (grad, 3, seed, 1e-7)
    table = (out / "stability_table.md").read_text()
    assert table.count("| ift_3 |") == 2 and table.count("| unrolled_3 |") == 2 and "| 2 |" in table
    assert (out / "stability.png").stat().st_size > 0 and (out / "stability.pdf").read_bytes()[:4] == b"%PDF"
    fig = plot_sweep(*read_rows(out / "stability_results.csv"))
    assert sorted(line.get_label() for line in fig.axes[0].get_lines()) == ["ift_3 (2 seeds)", "unrolled_3 (2 seeds)"]

    final = out / "ift_3" / "fashion_mnist" / path.stem / "final_state_seed0.pth.tar"
    before = final.stat().st_mtime_ns
    proc = run(cmd[:3] + ["1"] + cmd[4:], tmp, timeout=600)  # one seed: reuses its runs, sweeps again
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("exists, not retrained") == 2 and final.stat().st_mtime_ns == before
    assert len(list(csv.DictReader((out / "stability_results.csv").open()))) == 4
