"""scripts/wt103_deq_transformer.sh: the original script's flags land on the right config keys and tools."""
import os
import shlex
import shutil
import subprocess

import pytest

from conftest import COMPAT, REPO, needs_compat
from deqlab.config import load_config
from deqlab.compat.wt103 import commands
from deqlab.errors import ConfigError

# DEQ-Sequence/wt103_deq_transformer.sh's training flags, verbatim
ORIGINAL_TRAIN = ("train --cuda --data ./data/wikitext-103/ --dataset wt103 --adaptive --div_val 4 --n_layer 2 "
                  "--eval_n_layer 24 --d_embed 700 --d_model 700 --n_head 10 --d_head 70 --d_inner 48000 "
                  "--dropout 0.05 --dropatt 0.0 --optim Adam --lr 0.00025 --warmup_step 16000 --pretrain_steps 32000 "
                  "--eval-interval 5000 --max_step 300000 --tgt_len 150 --mem_len 150 --eval_tgt_len 150 --wnorm "
                  "--f_solver anderson --b_solver broyden --stop_mode rel --f_thres 30 --b_thres 35 "
                  "--jac_loss_weight 0.0 --jac_loss_freq 0.0 --jac_incremental 0 --batch_size 56 --gpu0_bsz 14")
QUICKSTART = "experiments/austen/deq_transformer_quickstart.yaml"
# the seeds' test-time sweep command (one budget)
ORIGINAL_EVAL = ("train --data wikitext-103/ --load pretrained_wt103_deqtrans_v3.pkl --name eval_18 --eval --mem_len 300 "
                 "--f_thres 18 --f_eps 1e-7 --f_solver broyden --pretrain_step 0 --debug --results_file res.csv")


def tool_of(cmd):
    """The deqlab tool a command line runs (python -m deqlab.compat.tools NAME ...)."""
    return cmd[cmd.index("deqlab.compat.tools") + 1]


def config_of(cmd):
    """The config a tool command line resolves to."""
    cfg_at = cmd.index("--cfg") + 1
    rest = cmd[cfg_at + 1:]
    while rest and rest[0].startswith("--"):  # --seed N, --results_file F
        rest = rest[2:]
    return load_config(REPO / cmd[cfg_at], rest)


def test_training_flags_map_to_the_config_they_stand_for():
    (cmd,) = commands(shlex.split(ORIGINAL_TRAIN))
    assert tool_of(cmd) == "lm_train" and cmd[1:3] == ["-m", "deqlab.compat.tools"]  # one process
    cfg = config_of(cmd)
    t, m = cfg.MODEL.TRANSFORMER, cfg.MODEL
    assert (m.NAME, m.NUM_LAYERS, t.EVAL_N_LAYER, t.D_EMBED, t.D_MODEL, t.N_HEAD, t.D_HEAD, t.D_INNER, t.DIV_VAL) == \
        ("deq_transformer", 2, 24, 700, 700, 10, 70, 48000, 4)
    assert (m.DROPOUT, t.DROPATT, m.WNORM, t.ADAPTIVE, t.PRE_LNORM) == (0.05, 0.0, True, True, False)
    assert (cfg.TRAIN.OPTIMIZER, cfg.TRAIN.LR, cfg.TRAIN.WARMUP_STEPS, cfg.TRAIN.PRETRAIN_STEPS) == ("adam", 0.00025, 16000, 32000)
    assert (cfg.TRAIN.EVAL_INTERVAL, cfg.TRAIN.MAX_STEP, cfg.TRAIN.BATCH_SIZE_PER_GPU) == (5000, 300000, 56)
    assert (cfg.LM.TGT_LEN, cfg.LM.MEM_LEN, cfg.LM.EVAL_TGT_LEN) == (150, 150, 150)
    assert (cfg.DEQ.F_SOLVER, cfg.DEQ.B_SOLVER, cfg.DEQ.STOP_MODE, cfg.DEQ.F_THRES, cfg.DEQ.B_THRES) == \
        ("anderson", "broyden", "rel", 30, 35)
    assert cfg.LOSS.JAC_INCREMENTAL == 100000000 and cfg.DEVICE == "cuda"  # 0 = never; --cuda
    assert (cfg.DATASET.DATASET, cfg.DATASET.ROOT) == ("wikitext103", "./data/wikitext-103/")
    # the shipped config holds the same values as the original script: the flags change nothing in it
    shipped = load_config(REPO / "experiments/wikitext103/deq_transformer.yaml", ["DEVICE", "cuda", "DATASET.ROOT",
                                                                                 "./data/wikitext-103/", "TRAIN.BATCH_SIZE_PER_GPU", "56"])
    assert cfg == shipped


def test_the_seeds_evaluation_command():
    cmds = commands(shlex.split(ORIGINAL_EVAL))
    assert [tool_of(c) for c in cmds] == ["lm_eval", "lm_eval"]
    assert cmds[0][cmds[0].index("--results_file") + 1] == "res.csv"
    valid, test = (config_of(c) for c in cmds)
    assert (valid.DATASET.TEST_SET, test.DATASET.TEST_SET) == ("valid", "test")
    assert (test.TEST.MODEL_FILE, test.LM.MEM_LEN, test.DEQ.F_THRES, test.DEQ.F_EPS, test.DEQ.F_SOLVER) == \
        ("pretrained_wt103_deqtrans_v3.pkl", 300, 18, 1e-7, "broyden")
    assert test.OUTPUT_DIR == "LM-TFM/eval_18" and test.TRAIN.PRETRAIN_STEPS == 0


def test_other_flags():
    (cmd,) = commands(shlex.split("train --pre_lnorm --not_tied --jac_incremental 30000 --max_eval_steps -1 --seed 7 "
                                  "--restart --restart_dir runs/a --optim RAdam --spectral_radius_mode "
                                  "--cfg experiments/wikitext103/deq_transformer_reg.yaml TRAIN.CLIP 0.5"))
    cfg = config_of(cmd)
    assert cmd[cmd.index("--seed") + 1] == "7"
    assert cfg.MODEL.TRANSFORMER.PRE_LNORM and not cfg.MODEL.TRANSFORMER.TIE_WEIGHTS and cfg.TRAIN.RESUME
    assert (cfg.LOSS.JAC_INCREMENTAL, cfg.LM.MAX_EVAL_STEPS, cfg.TRAIN.OPTIMIZER) == (30000, 0, "radam")
    assert cfg.TRAIN.RESUME_FILE == "runs/a/checkpoint.pth" and cfg.DEQ.SPECTRAL_RADIUS_MODE and cfg.TRAIN.CLIP == 0.5
    assert cfg.LOSS.JAC_LOSS_WEIGHT == 1.9  # from the _reg config


@pytest.mark.parametrize("args, needle", [
    ("train --f_thresh 30", "unknown flag --f_thresh"),
    ("train --dataset ptb", "--dataset ptb"),
    ("train --f_thres thirty", "--f_thres"),
    ("eval --mem_len 300", "needs --load"),
])
def test_bad_flags(args, needle):
    with pytest.raises(ConfigError, match=needle):
        commands(shlex.split(args))


def test_script_refuses_unknown_flags_in_one_line():
    proc = subprocess.run(["bash", "scripts/wt103_deq_transformer.sh", "train", "--f_thresh", "30"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--f_thresh" in proc.stderr


@needs_compat
def test_script_trains_on_a_data_folder_of_any_name(tmp_path):
    """--data DIR is the folder holding {train,valid,test}.txt, as in the original (not DIR/wikitext-103)."""
    from test_lm_engine import LM_TINY
    corpus = tmp_path / "Persuasion text"
    shutil.copytree(COMPAT / "deq_transformer" / "corpus", corpus)
    proc = subprocess.run(["bash", "scripts/wt103_deq_transformer.sh", "train", "--cfg", QUICKSTART, *LM_TINY,
                           "--data", str(corpus), "--dataset", "wt103", "--max_step", "2", "--eval-interval", "2",
                           "--work_dir", str(tmp_path / "LM-TFM"), "--name", "run"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test split, best weights" in proc.stdout
    assert (corpus / "deqlab_lm_cache.pt").is_file()  # the corpus was read there
    assert (tmp_path / "LM-TFM" / "run" / "wikitext103" / "deq_transformer_quickstart" / "final_state.pth").is_file()


def test_flags_after_key_value_pairs():
    (cmd,) = commands(shlex.split("train TRAIN.CLIP 0.5 --f_thres 20 LM.MEM_LEN 64 --wnorm --data d/"))
    cfg = config_of(cmd)
    assert (cfg.TRAIN.CLIP, cfg.DEQ.F_THRES, cfg.LM.MEM_LEN, cfg.MODEL.WNORM, cfg.DATASET.ROOT) == \
        (0.5, 20, 64, True, "d/")
