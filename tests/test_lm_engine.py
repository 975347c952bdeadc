"""Language modelling on the shared engine: DDP, exact resume, lm_eval's CSV rows, one-line errors."""
import csv
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import COMPAT, REPO, in_tmp, needs_compat
from deqlab.checkpoint import load_checkpoint, save_checkpoint
from deqlab.config import load_config
from deqlab.engine import Trainer
from deqlab.engine.optim import build_optimizer, build_scheduler
from deqlab.tasks import get_task
from deqlab.utils.dist import DistInfo

pytestmark = [needs_compat, pytest.mark.timeout(400)]
CFG = REPO / "experiments/austen/deq_transformer_quickstart.yaml"
# A few-thousand-parameter DEQ-Transformer on the 1,680-token Persuasion fixture corpus.
LM_TINY = [
    "MODEL.NUM_LAYERS", "2", "MODEL.DROPOUT", "0.0", "MODEL.TRANSFORMER.EVAL_N_LAYER", "3",
    "MODEL.TRANSFORMER.N_HEAD", "2", "MODEL.TRANSFORMER.D_HEAD", "8", "MODEL.TRANSFORMER.D_MODEL", "16",
    "MODEL.TRANSFORMER.D_EMBED", "16", "MODEL.TRANSFORMER.D_INNER", "32", "MODEL.TRANSFORMER.DROPATT", "0.0",
    "MODEL.TRANSFORMER.DIV_VAL", "2", "MODEL.TRANSFORMER.CUTOFFS", "[200, 500, 1000]",
    "DEQ.F_THRES", "6", "DEQ.B_THRES", "6", "DEQ.F_EPS", "1e-9", "DEQ.RAND_F_THRES_DELTA", "0",
    "LM.TGT_LEN", "8", "LM.MEM_LEN", "8", "LM.EVAL_TGT_LEN", "8", "LM.MAX_EVAL_STEPS", "4",
    "TRAIN.PRETRAIN_STEPS", "2", "TRAIN.MAX_STEP", "6", "TRAIN.EVAL_INTERVAL", "3", "TRAIN.WARMUP_STEPS", "0",
    "TRAIN.LR_SCHEDULER", "constant", "TRAIN.LR", "0.002", "TRAIN.BATCH_SIZE_PER_GPU", "4",
    "TEST.BATCH_SIZE_PER_GPU", "2", "DEVICE", "cpu", "PRINT_FREQ", "1", "WORKERS", "0",
]


@pytest.fixture
def lm_run(tmp_path):
    shutil.copytree(COMPAT / "deq_transformer" / "corpus", tmp_path / "data" / "austen")
    return in_tmp(LM_TINY, tmp_path), tmp_path


def final_params(tmp, sub="out"):
    return load_checkpoint(tmp / sub / "austen" / "deq_transformer_quickstart" / "final_state.pth")["model"]


def test_exact_resume_mid_epoch_with_memory(lm_run):
    overrides, tmp = lm_run
    full = Trainer(load_config(CFG, overrides + ["OUTPUT_DIR", str(tmp / "full")]), CFG, task="lm")
    full_metrics = full.fit()
    cut = Trainer(load_config(CFG, overrides + ["OUTPUT_DIR", str(tmp / "cut"), "TRAIN.MAX_STEP", "3"]), CFG, task="lm")
    cut.fit()
    state = load_checkpoint(cut.files.checkpoint)
    assert state["step"] == 3 and state["batch_in_epoch"] == 3 and len(state["task"]["mems"]) == 2
    assert state["task"]["mems"][0].shape == (8, 4, 16)  # (mem_len, streams, d_model): carried into step 4
    resumed = Trainer(load_config(CFG, overrides + ["OUTPUT_DIR", str(tmp / "cut"), "TRAIN.RESUME", "True"]), CFG,
                      task="lm")
    assert resumed.fit() == full_metrics and resumed.step == 6
    a, b = final_params(tmp, "full"), final_params(tmp, "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _ddp_worker(rank, init_file, overrides):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        Trainer(load_config(CFG, overrides), CFG, DistInfo(rank, 2, rank, torch.device("cpu")), task="lm").fit()
    finally:
        dist.destroy_process_group()


# SGD: Adam's g / sqrt(v) turns round-off in a near-zero gradient into a full-size step
LM_DDP = ["TRAIN.BATCH_SIZE_PER_GPU", "2", "TRAIN.MAX_STEP", "4", "TRAIN.EVAL_INTERVAL", "0",
          "TRAIN.OPTIMIZER", "sgd", "TRAIN.LR", "0.5"]


def lm_reference(overrides, ranks=2):
    """What a run of ``ranks`` processes with ``overrides`` must end with, trained in one process: the streams of
    every rank in one batch (the loss is a mean over equally many tokens per rank). Returns (model, initial
    state_dict)."""
    cfg = load_config(CFG, overrides)
    per_rank = cfg.TRAIN.BATCH_SIZE_PER_GPU
    cfg = load_config(CFG, overrides + ["TRAIN.BATCH_SIZE_PER_GPU", str(per_rank * ranks)])
    task = get_task("lm", cfg)
    torch.manual_seed(cfg.SEED)
    model = task.build_model()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, 1)
    model.train()
    task.start_pass(train=True)
    for step, (x, y) in enumerate(task.build_loader("train", distributed=False)):
        if step == cfg.TRAIN.MAX_STEP:
            break
        output, _ = task.forward(model, x, train_step=step, compute_jac_loss=False, f_thres=cfg.DEQ.F_THRES)
        optimizer.zero_grad()
        task.loss(output, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.TRAIN.CLIP)
        optimizer.step()
        scheduler.step()
    return model, init


def assert_trained_like(params, model, init):
    """``params`` (a checkpoint's) are ``model``'s to 1e-5, and training changed them; the largest difference."""
    diff = 0.0
    for name, value in model.state_dict().items():
        assert torch.allclose(params[name], value, atol=1e-5, rtol=0), name
        diff = max(diff, (params[name] - value).abs().max().item())
        if name in init and name.startswith(("func.", "word_emb.", "inject_conv.")):
            assert not torch.equal(value, init[name]), name  # trained, so the comparison means something
    return diff


def test_two_process_ddp_matches_one_process_and_resumes_exactly(lm_run):
    overrides, tmp = lm_run
    overrides = overrides + LM_DDP
    mp.spawn(_ddp_worker, args=(tempfile.mktemp(dir=tmp), overrides), nprocs=2, join=True)
    ddp = final_params(tmp)
    print(f"max |DDP - one process| {assert_trained_like(ddp, *lm_reference(overrides)):.2e}")
    # cut after step 2 mid-epoch and resumed: every rank continues with its own streams' memory
    cut = overrides + ["OUTPUT_DIR", str(tmp / "cut")]
    mp.spawn(_ddp_worker, args=(tempfile.mktemp(dir=tmp), cut + ["TRAIN.MAX_STEP", "2"]), nprocs=2, join=True)
    state = load_checkpoint(tmp / "cut" / "austen" / "deq_transformer_quickstart" / "checkpoint.pth")
    assert state["step"] == 2 and state["task"]["mems"][0].shape == (8, 4, 16)  # both ranks' 2 streams
    mp.spawn(_ddp_worker, args=(tempfile.mktemp(dir=tmp), cut + ["TRAIN.RESUME", "True"]), nprocs=2, join=True)
    resumed = final_params(tmp, "cut")
    assert all(torch.equal(ddp[k], resumed[k]) for k in ddp)


def test_ddp_searches_for_unused_parameters_only_where_a_step_can_leave_some(lm_run):
    """A tail cluster of the adaptive softmax that a batch misses gets no gradient: DDP must search for unused
    parameters then (without the search the DDP test above fails); without tail clusters none ever is unused."""
    overrides, _ = lm_run
    for extra, expected in (([], True), (["MODEL.TRANSFORMER.CUTOFFS", "[]"], False)):
        task = get_task("lm", load_config(CFG, overrides + extra))
        torch.manual_seed(0)
        model = task.build_model()
        task.start_pass(train=True)
        unused = set()
        for step, (x, _) in enumerate(task.build_loader("train", distributed=False)):
            if step == 8:  # past TRAIN.PRETRAIN_STEPS: the unrolled stack and the equilibrium
                break
            model.zero_grad(set_to_none=True)
            task.forward(model, x, train_step=step)[0].mean().backward()
            unused |= {name for name, p in model.named_parameters() if p.grad is None}
        assert bool(unused) == task.find_unused_parameters == expected, unused


def run(args, tmp):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_train_tool_then_eval_rows(lm_run):
    overrides, tmp = lm_run
    proc = run(["tools/lm_train.py", "--cfg", CFG, *overrides], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test split, best weights" in proc.stdout and "ppl" in proc.stdout
    ckpt = tmp / "out" / "austen" / "deq_transformer_quickstart" / "final_state.pth"
    rows_file = tmp / "sweep.csv"
    for f_thres in (2, 5):
        proc = run(["tools/lm_eval.py", "--cfg", CFG, "--results_file", rows_file, *overrides, "TEST.MODEL_FILE", ckpt,
                    "DATASET.TEST_SET", "test", "DEQ.F_THRES", f_thres, "LM.MEM_LEN", 6], tmp)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "test perplexity" in proc.stdout
    rows = list(csv.DictReader(rows_file.open()))
    assert [(r["f_thres"], r["mem_len"], r["split"], r["f_eps"]) for r in rows] == [("2", "6", "test", "1e-09"),
                                                                                   ("5", "6", "test", "1e-09")]
    assert [float(r["fwd_nfe"]) for r in rows] == [2.0, 5.0]  # Anderson's budget counts f evaluations
    assert float(rows[1]["fwd_residual"]) < float(rows[0]["fwd_residual"])
    for r in rows:
        assert abs(float(r["ppl"]) - torch.tensor(float(r["loss"])).exp().item()) < 1e-3 * float(r["ppl"])


def test_bad_input(lm_run):
    overrides, tmp = lm_run
    out = ["OUTPUT_DIR", tmp / "bad_out"]
    proc = run(["tools/lm_train.py", "--cfg", CFG, *overrides, *out, "MODEL.TRANSFORMER.D_EMBED", "4"], tmp)
    assert_one_line_error(proc, "d_embed 4", "div_val 2")
    corpus = tmp / "data" / "austen"
    for split in ("train", "valid", "test"):  # a vocabulary without <unk>: nothing to map unknown words to
        (corpus / f"{split}.txt").write_text((corpus / f"{split}.txt").read_text().replace(" <unk>", ""))
    (corpus / "valid.txt").write_text((corpus / "valid.txt").read_text() + " zyzzyva \n")
    assert_one_line_error(run(["tools/lm_train.py", "--cfg", CFG, *overrides, *out], tmp), "zyzzyva", "valid.txt")
    (corpus / "train.txt").unlink()
    assert_one_line_error(run(["tools/lm_train.py", "--cfg", CFG, *overrides, *out], tmp), "train.txt")
    assert not (tmp / "bad_out").exists()


def test_checkpoint_of_another_vocabulary(lm_run):
    overrides, tmp = lm_run
    cfg = load_config(CFG, overrides)
    model = get_task("lm", cfg).build_model()
    save_checkpoint(tmp / "ok.pth", {"model": model.state_dict()})
    other = load_config(CFG, overrides + ["MODEL.TRANSFORMER.CUTOFFS", "[100, 500, 1000]"])
    proc = run(["tools/lm_eval.py", "--cfg", CFG, *overrides, "MODEL.TRANSFORMER.CUTOFFS", "[100, 500, 1000]",
                "TEST.MODEL_FILE", tmp / "ok.pth"], tmp)
    assert_one_line_error(proc, "1680-token vocabulary", "[200, 300, 500, 680]", "CUTOFFS")
    assert other.MODEL.TRANSFORMER.CUTOFFS == [100, 500, 1000]


def tb_scalars(tb_dir):
    """{tag: [(step, value)]} from the tensorboardX event files under ``tb_dir`` (TFRecord framing: length,
    its CRC, the Event proto, its CRC)."""
    import struct

    from tensorboardX.proto import event_pb2
    scalars = {}
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def unrolled_loss(model, data, target, depth):
    """The mean NLL of one segment (no memory) through ``depth`` explicit applications of the cell from z = 0."""
    from deqlab.layers import reset_per_forward
    reset_per_forward(model)
    qlen, bsz = data.shape
    u = model.injection(data)
    pos_emb = model.pos_emb(torch.arange(qlen - 1, -1, -1.0))
    empty, z = u.new_zeros(bsz, model.d_model, 0), u.new_zeros(bsz, model.d_model, qlen)
    for _ in range(depth):
        z = model.func(z, u, empty, pos_emb)
    return model.crit(z.permute(2, 0, 1).reshape(-1, model.d_model), target.reshape(-1)).mean().item()


def test_validation_while_pretraining_evaluates_the_unrolled_stack(lm_run, caplog):
    """As locuslab/deq's train_transformer.py: evaluate() passes the current train_step (>= 1), so while
    pretraining the model unrolls n_layer (the eval_n_layer branch needs train_step 0); the best weights are
    chosen on that number. After pretraining: the equilibrium, with the spectral radius when asked for."""
    overrides, tmp = lm_run
    overrides = overrides + ["TRAIN.PRETRAIN_STEPS", "4", "TRAIN.EVAL_INTERVAL", "3", "LM.MAX_EVAL_STEPS", "1",
                             "MODEL.TRANSFORMER.EVAL_N_LAYER", "5", "DEQ.SPECTRAL_RADIUS_MODE", "True",
                             "MODEL.TRANSFORMER.PRE_LNORM", "True"]  # pre-LN: the depth shows in the loss
    cfg = load_config(CFG, overrides + ["TRAIN.MAX_STEP", "3"])
    trainer = Trainer(cfg, CFG, task="lm")
    trainer.fit()  # one validation, at step 3 < PRETRAIN_STEPS: it made the best weights
    metrics = load_checkpoint(trainer.files.best)["metrics"]
    task = get_task("lm", cfg)
    model = task.build_model().eval()
    model.load_state_dict(load_checkpoint(trainer.files.best)["model"])
    (data, target), _ = next(iter(task.build_loader("test", distributed=False)))
    with torch.no_grad():
        depth2, depth5 = unrolled_loss(model, data, target, 2), unrolled_loss(model, data, target, 5)
        equilibrium = model(data, target, train_step=-1)[0].mean().item()
    assert metrics["loss"] == pytest.approx(depth2, rel=1e-6, abs=0)
    # what was measured is that depth: the others differ by > 10x the match's tolerance (~8e-6 here)
    assert abs(depth2 - depth5) > 1e-4 and abs(depth2 - equilibrium) > 1e-4
    assert "sradius" not in metrics and metrics["fwd_steps"] == 0  # no equilibrium: no solver, no radius

    resumed = Trainer(load_config(CFG, overrides + ["TRAIN.MAX_STEP", "6", "TRAIN.RESUME", "True"]), CFG, task="lm")
    with caplog.at_level("INFO", logger="deqlab"):
        resumed.fit()  # validation at step 6 >= PRETRAIN_STEPS: the equilibrium
    scalars = tb_scalars(resumed.files.tb_dir)
    assert [step for step, _ in scalars["valid/loss"]] == [3, 6] and scalars["valid/fwd_nfe"][1] == (6, 6.0)
    ((step, sradius),) = scalars["valid/sradius"]
    assert step == 6 and sradius > 0.05
    assert f"valid: spectral radius of df/dz at z* (power iteration, mean of the evaluation): {sradius:.4f}" \
        in caplog.text
