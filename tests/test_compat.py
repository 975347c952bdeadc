"""deqlab.compat: the torchdeq zoo's command lines (scripts/run_mdeq.sh, scripts/run.sh) land on the config keys
they stand for; every flag deqlab cannot honour is refused in one line that says why."""
import csv
import os
import shlex
import subprocess
import sys

import pytest

from conftest import REPO
from deqlab.compat import torchdeq, zoo_cifar, zoo_imagenet
from deqlab.config import load_config
from deqlab.errors import ConfigError

# deq-zoo/mdeq/mdeq_imagenet/run_mdeq.sh's flags, verbatim (the data path is the user's)
ZOO_IMAGENET = ("--data YOUR_DATA_PATH --save-path ./log_dir --workers 8 --batch-size 64 --learning-rate 0.05 "
                "--nesterov --epochs 100 --wd 0.00005 --warmup 0 --f_max_iter 26 --f_solver fixed_point_iter "
                "--grad 5 --norm_type weight_norm")
# deq-zoo/mdeq/mdeq_cifar/run.sh and run_small.sh, verbatim
ZOO_CIFAR_LARGE = ("--cfg ./configs/large.yaml --norm_type weight_norm --f_solver broyden --f_max_iter 18 --grad 5 "
                   "--tau 0.7 --exp_id large")
ZOO_CIFAR_SMALL = ("--cfg ./configs/small.yaml --norm_type weight_norm --f_solver broyden --f_max_iter 22 --grad 5 "
                   "--tau 0.5 --exp_id small")


def tool_of(cmd):
    return cmd[cmd.index("deqlab.compat.tools") + 1]


def config_of(cmd):
    """The config a tool command line resolves to (its --cfg and KEY VALUE pairs; tool flags skipped)."""
    args = cmd[cmd.index("deqlab.compat.tools") + 2:]
    path, rest, pairs = None, list(args), []
    while rest:
        word = rest.pop(0)
        if word == "--cfg":
            path = rest.pop(0)
        elif word.startswith("--"):
            rest.pop(0)
        else:
            pairs += [word, rest.pop(0)]
    return load_config(REPO / path, pairs)


def imagenet(line):
    (cmd,) = zoo_imagenet.commands(shlex.split(line) + ["--loader", "torchvision"])
    return cmd, config_of(cmd)


def cifar(line):
    (cmd,) = zoo_cifar.commands(shlex.split(line))
    return cmd, config_of(cmd)


def test_zoo_imagenet_line_is_the_default_recipe():
    cmd, cfg = imagenet(ZOO_IMAGENET)
    assert tool_of(cmd) == "cls_train" and cmd[cmd.index("--cfg") + 1] == zoo_imagenet.ZOO_CONFIG
    d, t = cfg.DEQ, cfg.TRAIN
    assert (d.F_SOLVER, d.F_THRES, d.GRAD, d.PHANTOM_STEPS, cfg.MODEL.WNORM) == ("fixed_point", 26, "phantom", 5, True)
    assert (t.OPTIMIZER, t.LR, t.NESTEROV, t.WD, t.WARMUP_STEPS, t.END_EPOCH, t.BATCH_SIZE_PER_GPU) == \
        ("sgd", 0.05, True, 5e-5, 0, 100, 64)
    assert (cfg.DATASET.ROOT, cfg.OUTPUT_DIR, cfg.LOG_DIR, cfg.WORKERS) == ("YOUR_DATA_PATH", "./log_dir",
                                                                            "./log_dir/log", 8)
    # the script's defaults are the zoo's line: only --data and --save-path change anything
    _, plain = imagenet("--data YOUR_DATA_PATH --save-path ./log_dir")
    assert plain == cfg


@pytest.mark.parametrize("line, recipe, f_thres, tau", [(ZOO_CIFAR_LARGE, "large", 18, 0.7),
                                                        (ZOO_CIFAR_SMALL, "small", 22, 0.5)])
def test_zoo_cifar_lines_are_the_recipes(line, recipe, f_thres, tau):
    cmd, cfg = cifar(line)
    assert tool_of(cmd) == "cls_train"
    assert cmd[cmd.index("--cfg") + 1] == zoo_cifar.ZOO_CONFIGS[f"configs/{recipe}.yaml"]
    assert (cfg.DEQ.F_SOLVER, cfg.DEQ.F_THRES, cfg.DEQ.GRAD, cfg.DEQ.PHANTOM_STEPS, cfg.DEQ.PHANTOM_TAU) == \
        ("broyden", f_thres, "phantom", 5, tau)
    assert cfg.OUTPUT_DIR == f"runs/{recipe}" and cfg.MODEL.WNORM
    shipped = load_config(REPO / zoo_cifar.ZOO_CONFIGS[f"configs/{recipe}.yaml"], ["OUTPUT_DIR", f"runs/{recipe}"])
    assert cfg == shipped  # the flags restate the recipe
    if recipe == "large":  # run.sh without arguments is the zoo's run.sh
        assert cifar("--exp_id large")[1] == cfg


def test_torchdeq_flags_map_to_config_keys():
    _, cfg = imagenet("--data d --f_solver simple_fixed_point_iter --b_solver anderson --b_max_iter 12 --f_tol 1e-4 "
                      "--b_tol 1e-7 --f_stop_mode rel --b_stop_mode rel --gamma 0.5 --tau 0.6 --sup_gap 2 "
                      "--jac_loss_weight 0.3 --jac_loss_freq 0.2 --jac_incremental 0 --sradius_mode --core sliced "
                      "--n_states 1 --norm_clip_value 1.0 --eval_factor 1.5 --norm_type none --start-epoch 3 "
                      "--print-freq 7 --num-classes 10 --momentum 0.8 -j 2 --weight-decay 1e-3 --imcrop 192 "
                      "--imsize 219 --dali-cpu --rec")
    d, loss = cfg.DEQ, cfg.LOSS
    assert (d.F_SOLVER, d.B_SOLVER, d.B_THRES, d.F_EPS, d.B_EPS, d.STOP_MODE) == ("fixed_point", "anderson", 12,
                                                                                  1e-4, 1e-7, "rel")
    assert (d.PHANTOM_TAU, loss.FPC, loss.FPC_GAP, loss.FPC_GAMMA) == (0.6, True, 2, 0.5)
    assert (loss.JAC_LOSS_WEIGHT, loss.JAC_LOSS_FREQ, loss.JAC_INCREMENTAL, d.SPECTRAL_RADIUS_MODE) == \
        (0.3, 0.2, 100000000, True)
    assert cfg.TEST.F_THRES == 39 and not cfg.MODEL.WNORM  # 26 * 1.5
    assert (cfg.TRAIN.BEGIN_EPOCH, cfg.PRINT_FREQ, cfg.MODEL.NUM_CLASSES, cfg.TRAIN.MOMENTUM, cfg.WORKERS,
            cfg.TRAIN.WD, cfg.MODEL.IMAGE_SIZE) == (3, 7, 10, 0.8, 2, 1e-3, [192, 192])
    assert (cfg.DATASET.DALI_DEVICE, cfg.DATASET.DATA_FORMAT) == ("cpu", "rec")
    _, cfg = imagenet("--data d --ift --grad 3 --sup_gap -1 --eval_f_max_iter 7 --eval_factor 2")
    assert (cfg.DEQ.GRAD, cfg.LOSS.FPC, cfg.TEST.F_THRES) == ("ift", False, 7)  # --ift replaces the phantom grad
    _, cfg = cifar("--hook_ift --f_solver anderson")
    assert (cfg.DEQ.GRAD, cfg.DEQ.F_SOLVER) == ("ift", "anderson")
    _, cfg = cifar("--log_dir L --data_dir D --repeat 1 --modelDir M --percent 0.5")  # main.py's, locuslab/mdeq's
    assert (cfg.LOG_DIR, cfg.DATA_DIR, cfg.OUTPUT_DIR, cfg.PERCENT) == ("L", "D", "M", 0.5)


def test_norm_flags_map_to_the_cell_norm_keys():
    _, cfg = imagenet("--data d --norm_type spectral_norm --norm_no_scale --norm_clip --norm_clip_value 2 "
                      "--norm_target_norm 3 --sn_n_power_iters 4")
    m = cfg.MODEL
    assert (m.NORM_TYPE, m.WNORM, m.NORM_NO_SCALE, m.NORM_CLIP, m.NORM_CLIP_VALUE, m.NORM_TARGET_NORM,
            m.SN_N_POWER_ITERS) == ("spectral_norm", True, True, True, 2.0, 3.0, 4)
    # the pair wins over the flag's WNORM True: a contradiction the config names
    with pytest.raises(ConfigError, match="MODEL.NORM_TYPE must be one of auto, none when MODEL.WNORM is False"):
        cifar("--norm_type weight_norm MODEL.WNORM False")


def test_eval_lines():
    cmd, cfg = imagenet("--eval --data d --resume ck.pth --eval_f_max_iter 10 --results_name r.csv")
    assert tool_of(cmd) == "cls_valid" and cmd[cmd.index("--results_name") + 1] == "r.csv"
    assert (cfg.TEST.MODEL_FILE, cfg.TEST.F_THRES, cfg.TRAIN.RESUME_FILE) == ("ck.pth", 10, "")
    _, cfg = imagenet("--data d --resume ck.pth")
    assert (cfg.TRAIN.RESUME_FILE, cfg.TEST.MODEL_FILE) == ("ck.pth", "")
    cmd, cfg = cifar(ZOO_CIFAR_SMALL + " --eval --test_model w.pth --eval_f_max_iter 6")
    assert tool_of(cmd) == "cls_valid" and (cfg.TEST.MODEL_FILE, cfg.TEST.F_THRES) == ("w.pth", 6)
    cmd, cfg = cifar(ZOO_CIFAR_SMALL + " --eval")  # main.py evaluates the run's final weights
    assert cfg.TEST.MODEL_FILE == "runs/small/cifar10/cls_mdeq_zoo_small/final_state.pth"


def test_key_value_pairs_win_and_flags_come_anywhere():
    _, cfg = imagenet("DEQ.F_THRES 4 --data d TRAIN.LR 0.2 --f_max_iter 9 --learning-rate 0.3")
    assert (cfg.DEQ.F_THRES, cfg.TRAIN.LR, cfg.DATASET.ROOT) == (4, 0.2, "d")
    _, cfg = cifar("TRAIN.END_EPOCH 3 --cfg ./configs/small.yaml --tau 0.9")
    assert (cfg.TRAIN.END_EPOCH, cfg.DEQ.PHANTOM_TAU, cfg.DEQ.F_THRES) == (3, 0.9, 22)
    # a list flag takes only the numbers after it, not the pairs that follow
    _, cfg = cifar("--grad 4 DEQ.F_THRES 3 DEQ.F_THRES 5 --sup_gap 2 LOSS.FPC_GAMMA 0.5")
    assert (cfg.DEQ.PHANTOM_STEPS, cfg.DEQ.F_THRES, cfg.LOSS.FPC_GAP, cfg.LOSS.FPC_GAMMA) == (4, 5, 2, 0.5)


REFUSED = [  # (script module, flags, what the one line must say)
    (zoo_imagenet, "--core indexing", "--core indexing: deqlab's DEQ is torchdeq's sliced core"),
    (zoo_imagenet, "--n_states 2", "--n_states 2: deqlab supervises the phantom-gradient states"),
    (zoo_imagenet, "--indexing 3 6", "--indexing 3 6: deqlab supervises the phantom-gradient states"),
    (zoo_imagenet, "--sup_loc 1 2", "--sup_loc 1 2: deqlab supervises every --sup_gap-th phantom state"),
    (zoo_imagenet, "--grad 3 5", "--grad 3 5: one phantom-gradient step count per state"),
    (zoo_imagenet, "--f_solver newton", "--f_solver newton: expected one of anderson, broyden, fixed_point_iter"),
    (zoo_imagenet, "--b_solver lbfgs", "--b_solver lbfgs: expected one of anderson"),
    (zoo_imagenet, "--b_stop_mode rel", "--b_stop_mode rel: deqlab's forward and backward solvers share DEQ.STOP_MODE"),
    (zoo_imagenet, "--warmup 5", "--warmup 5: deqlab's warm-up counts iterations: use TRAIN.WARMUP_STEPS"),
    (zoo_imagenet, "--imsize 300", "--imsize 300: deqlab resizes the shorter side to the crop / 0.875 (256"),
    (zoo_imagenet, "--local_rank 0", "--local_rank 0: set by a launcher"),
    (zoo_imagenet, "--eval", "--eval needs --resume CKPT"),
    (zoo_imagenet, "DEQ.F_THRES 3 --f_max_iters 3", "run_mdeq.sh: unknown flag --f_max_iters"),
    (zoo_cifar, "--repeat 3", "--repeat 3: run the script once per repeat"),
    (zoo_cifar, "-r 2", "--repeat 2: run the script once per repeat"),
    (zoo_cifar, "--grad 5 DEQ.F_THRES 3 --bogus 1", "run.sh: unknown flag --bogus"),
    (zoo_cifar, "--f_max_iter many", "run.sh: argument --f_max_iter: invalid int value: 'many'"),
]


@pytest.mark.parametrize("module, flags, needle", REFUSED, ids=[r[1] for r in REFUSED])
def test_refused_flags_are_one_line_exit_2(module, flags, needle, capsys):
    assert module.main(["--data", "d", *shlex.split(flags)] if module is zoo_imagenet else shlex.split(flags)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and needle in err, err


def test_every_add_deq_args_flag_is_in_the_table():
    # torchdeq/utils/arg_utils.py's add_deq_args, as of the torchdeq release the zoo pins
    flags = ("f_solver b_solver f_max_iter b_max_iter f_tol b_tol f_stop_mode b_stop_mode eval_factor "
             "eval_f_max_iter norm_type norm_no_scale norm_clip norm_clip_value norm_target_norm sn_n_power_iters "
             "core ift hook_ift n_states indexing gamma grad tau sup_gap sup_loc jac_loss_weight jac_loss_freq "
             "jac_incremental sradius_mode").split()
    assert sorted(f"--{f}" for f in flags) == sorted(torchdeq.FLAGS)


def run_script(script, *args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(["bash", f"scripts/{script}", *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=280)


def test_script_refuses_in_one_line():
    proc = run_script("run.sh", "--core", "indexing")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "sliced core" in proc.stderr


CIFAR_TINY = [
    "MODEL.EXTRA.FULL_STAGE.NUM_BRANCHES", "2", "MODEL.EXTRA.FULL_STAGE.NUM_BLOCKS", "[1, 1]",
    "MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS", "[4, 8]", "MODEL.EXTRA.FULL_STAGE.HEAD_CHANNELS", "[2, 4]",
    "MODEL.EXTRA.FULL_STAGE.FINAL_CHANSIZE", "16", "MODEL.NUM_GROUPS", "2", "MODEL.EXPANSION_FACTOR", "2",
    "MODEL.NUM_LAYERS", "2", "DEQ.F_THRES", "4", "DEQ.PHANTOM_STEPS", "2", "TRAIN.END_EPOCH", "1",
    "TRAIN.BATCH_SIZE_PER_GPU", "10", "TEST.BATCH_SIZE_PER_GPU", "4", "TRAIN.PRECISE_BN_BATCHES", "2", "WORKERS", "0",
    "PRINT_FREQ", "1", "DEVICE", "cpu",
]


@pytest.mark.timeout(600)
def test_zoo_cifar_lines_train_and_evaluate(tmp_path):
    """run.sh and run_small.sh's lines, verbatim, with tiny overrides appended: train, evaluate the named weights
    at a test-time budget (--eval_f_max_iter), and evaluate the run's own final weights (no --test_model)."""
    from test_data import write_cifar

    write_cifar(tmp_path / "cifar10")
    tiny = CIFAR_TINY + ["DATASET.ROOT", tmp_path / "cifar10", "OUTPUT_DIR", tmp_path / "runs", "LOG_DIR",
                         tmp_path / "log"]
    train = run_script("run.sh", *shlex.split(ZOO_CIFAR_LARGE), *tiny)
    assert train.returncode == 0, train.stderr[-3000:]
    final = tmp_path / "runs/cifar10/cls_mdeq_zoo_large/final_state.pth"
    assert final.is_file() and "epoch 1/1" in train.stdout + train.stderr
    csv_path = tmp_path / "budget.csv"
    for extra in (["--test_model", final, "--eval_f_max_iter", 2], []):  # flags after the KEY VALUE pairs
        proc = run_script("run.sh", *shlex.split(ZOO_CIFAR_LARGE), "--eval", *tiny, "DEQ.F_EPS", "1e-12", *extra,
                          "--results_name", csv_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(csv_path.open()))
    assert [(r["checkpoint"], int(r["f_thres"]), int(r["count"])) for r in rows] == [(str(final), 2, 7),
                                                                                    (str(final), 4, 7)]
    assert float(rows[0]["fwd_steps"]) <= 2 < float(rows[1]["fwd_steps"])


def test_tools_by_name_run_outside_a_checkout(tmp_path):
    """python -m deqlab.compat.tools NAME (what the launchers run) needs no tools/ folder: run from elsewhere."""
    cfg = REPO / "experiments/cifar/cls_mdeq_TINY.yaml"
    proc = subprocess.run(tools_cmd("cls_valid", "--cfg", cfg, "DEQ.F_THRES", "3", "--percent", "2"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "PERCENT must be" in proc.stderr


def tools_cmd(name, *args):
    from deqlab.compat import tools

    return tools.command(name, list(map(str, args)))


@pytest.mark.parametrize("codes, ran, status", [((0, 3), ["a", "b"], 3), ((4, 0), ["a"], 4)])
def test_execute_runs_in_turn_and_stops_at_a_failure(codes, ran, status, tmp_path):
    """wt103's evaluation runs two tools (valid, then test): the second only when the first succeeded."""
    step = "import pathlib, sys; pathlib.Path(sys.argv[1]).touch(); sys.exit(int(sys.argv[2]))"
    cmds = [[sys.executable, "-c", step, str(tmp_path / name), str(code)] for name, code in zip("ab", codes)]
    proc = subprocess.run([sys.executable, "-c", "import sys; from deqlab.compat.tools import execute; "
                           f"sys.exit(execute({cmds!r}))"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == status, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ran
