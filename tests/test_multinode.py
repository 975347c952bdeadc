"""Two nodes on one machine: two ``torchrun`` agents (one process each, c10d rendezvous, gloo) run the real train
tools, each node with its own OUTPUT_DIR and LOG_DIR as on machines that share no disk. They must train what
one process trains on the same global batches, and refuse to resume from a checkpoint only one node has."""
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO, ddp_reference, needs_compat
from deqlab.checkpoint import load_checkpoint
from deqlab.config import load_config
from deqlab.utils.dist import free_port
from test_lm_engine import CFG as LM_CFG, LM_DDP, assert_trained_like, lm_reference, lm_run  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(600)
CLS_CFG = REPO / "experiments/fashion_mnist/cls_mdeq_quickstart.yaml"


def two_nodes(tool, cfg, overrides, tmp, timeout=300):
    """Run ``tool`` as two torchrun agents (nodes) of one process each; node i writes under ``tmp/node{i}``.
    Returns the agents' (returncode, stdout, stderr)."""
    endpoint = f"localhost:{free_port()}"
    procs = []
    for node in range(2):
        outputs = ["OUTPUT_DIR", tmp / f"node{node}" / "out", "LOG_DIR", tmp / f"node{node}" / "log"]
        args = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "two_nodes",
                REPO / "tools" / tool, "--cfg", cfg, *overrides, *outputs]
        procs.append(subprocess.Popen([str(a) for a in args], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))  # its own group: a hang is killed with its workers
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            results.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    return results


def main_node(tmp, run_path):
    """The node whose rank 0 wrote the run's files (c10d numbers the nodes in the order they join); the other
    node must have written nothing."""
    written = [node for node in range(2) if (tmp / f"node{node}" / "out").exists()]
    assert len(written) == 1, written
    assert (tmp / f"node{written[0]}" / "out" / run_path / "final_state.pth").is_file()
    return tmp / f"node{written[0]}" / "out" / run_path


def assert_ran(results):
    for rc, _, err in results:
        assert rc == 0, err[-3000:]


def test_two_nodes_train_a_classifier_like_one_process(tiny_run):
    path, overrides, tmp = tiny_run
    overrides = overrides + ["TRAIN.END_EPOCH", "1", "TRAIN.BATCH_SIZE_PER_GPU", "8"]
    assert_ran(two_nodes("cls_train.py", path, overrides, tmp))
    run_dir = main_node(tmp, "fashion_mnist/cls_mdeq_quickstart")
    trained = load_checkpoint(run_dir / "final_state.pth")["model"]
    model, init = ddp_reference(load_config(path, overrides))
    diff = 0.0
    for name, param in model.named_parameters():
        assert not torch.equal(param.detach(), init[name]) or param.grad is None, name
        assert torch.allclose(trained[name], param.detach(), atol=1e-5, rtol=0), name
        diff = max(diff, (trained[name] - param.detach()).abs().max().item())
    print(f"max |two nodes - one process| {diff:.2e}")

    # Only one node has the checkpoint: both refuse to resume, in one line naming the file and the rank without it
    # (rather than one rank resuming and the other starting afresh). Which node is rank 0 may change.
    results = two_nodes("cls_train.py", path, overrides + ["TRAIN.RESUME", "True", "TRAIN.END_EPOCH", "2"], tmp)
    assert all(rc != 0 for rc, _, _ in results)
    errors = [line for _, _, err in results for line in err.splitlines() if line.startswith("error:")]
    pattern = rf"error: TRAIN.RESUME: checkpoint {tmp}/node[01]/out/\S+/checkpoint.pth is missing on rank\(s\) [01] of 2: "
    assert errors and all(re.match(pattern, line) for line in errors), errors


@needs_compat  # the corpus fixture
def test_two_nodes_train_a_language_model_like_one_process(lm_run):
    overrides, tmp = lm_run
    overrides = overrides + LM_DDP
    # ends with the test split on the best weights, which only the main node has on its disk
    results = two_nodes("lm_train.py", LM_CFG, overrides, tmp)
    assert_ran(results)
    assert any("test split, best weights" in out + err for _, out, err in results)
    run_dir = main_node(tmp, "austen/deq_transformer_quickstart")
    diff = assert_trained_like(load_checkpoint(run_dir / "final_state.pth")["model"], *lm_reference(overrides))
    print(f"max |two nodes - one process| {diff:.2e}")
