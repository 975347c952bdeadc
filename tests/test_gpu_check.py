"""The GPU acceptance run in its CPU mode (scripts/gpu_check.sh on a machine without CUDA): every check present,
none failed, and only the CUDA-only ones (and the budget's and the originals' declared skips) n/a."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, needs_debian_fashion

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI not installed: pip install -e '.[dali]' (scripts/test.sh does)")
sys.path.insert(0, str(REPO / "benchmarks"))
from gpu_check import CUDA_ONLY  # noqa: E402
from gpu_check_steps import CPU_BUDGET_SKIPS, DTYPES, MODES  # noqa: E402

pytestmark = [needs_debian_fashion, pytest.mark.timeout(400)]


def test_cpu_mode_passes_every_cpu_check_and_says_why_cuda_ones_did_not_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "DEQLAB_NO_INSTALL": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "scripts/gpu_check.sh"), "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=380)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["check"]: r for r in result["rows"]}
    expected = {f"amp/{t}/{m}/{d}" for t in ("cls", "seg", "lm") for m in MODES for d in DTYPES}
    expected |= {"channels_last/cls", "channels_last/seg", "compile/cls", "compile/seg", "compile/lm", "syncbn/seg",
                 "dist/gloo/1", "dist/gloo/2", "dist/nccl/1", "dist/nccl/2", "dali/mixed_vs_cpu/jpeg",
                 "dali/mixed_vs_cpu/rec", "dali/cpu/rec_vs_jpeg", "timing/ours/t4", "timing/ours_nchw/t4",
                 "timing/originals"}
    assert expected <= set(rows), expected - set(rows)
    assert not [r for r in rows.values() if r["status"] == "fail"]
    not_run = {name for name, r in rows.items() if r["status"] == "n/a"}
    assert not_run == CUDA_ONLY | CPU_BUDGET_SKIPS | {"timing/originals"}
    assert all(rows[name]["reason"] for name in not_run) and result["originals"] == "originals not given"
    for name in expected - not_run:  # every measured value within its tolerance
        if isinstance(rows[name]["tolerance"], float):
            assert rows[name]["value"] <= rows[name]["tolerance"], name
    assert all(rows[f"timing/{v}/t4"]["value"]["train_s"] > 0 for v in ("ours", "ours_nchw"))
    assert result["device"] == "cpu" and {"check", "device", "status", "value", "tolerance"} <= set(rows["dist/gloo/2"])
    assert "amp/cls/ift/float16" in proc.stdout and "pass" in proc.stdout  # the table
