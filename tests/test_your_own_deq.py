"""docs/your_own_deq.md runs as written, and examples/polynomial_fitting.py writes consistent numbers."""
import json
import math
import os
import re
import subprocess
import sys

from conftest import REPO

DOC = REPO / "docs" / "your_own_deq.md"


def python_blocks(text: str) -> list[str]:
    """Every fenced ``python`` block, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)


def test_your_own_deq_runs_in_order_and_trains():
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 6
    namespace: dict = {}
    for i, block in enumerate(blocks):  # the blocks assert their own claims (convergence, gradients, ...)
        exec(compile(block, f"{DOC}:python block {i + 1}", "exec"), namespace)
    losses = namespace["losses"]
    assert len(losses) == 30 and all(map(math.isfinite, losses)) and losses[-1] < 0.2 * losses[0]
    fwd, bwd = namespace["info"]["fwd"], namespace["info"]["bwd"]
    # the Skip DEQ block's last step: a forward solve within budget, and an adjoint solve whose first evaluation
    # (at g = 0) cost no VJP
    assert 1 <= fwd["nfe"] <= 20 and namespace["info"]["skip_loss"] is not None
    assert bwd["nfe"] >= 1 and bwd["vjp_evals"] == bwd["nfe"] - 1


def test_polynomial_fitting_writes_a_figure_and_consistent_numbers(tmp_path):
    steps = 12
    run = subprocess.run([sys.executable, str(REPO / "examples" / "polynomial_fitting.py"), "--steps", str(steps),
                          "--seed", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "MPLBACKEND": "Agg"})
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "polynomial_fitting.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "polynomial_fitting.json").read_text())
    assert data["config"]["steps"] == steps and set(data["models"]) == {"DEQ", "Skip DEQ"}
    for name, result in data["models"].items():
        assert len(result["loss"]) == len(result["nfe"]) == steps
        assert all(math.isfinite(loss) for loss in result["loss"])
        # Broyden at max_iter 50: f(z0) and at most 50 steps
        assert all(isinstance(n, int) and 1 <= n <= 51 for n in result["nfe"])
        assert name in run.stdout
    # Same data, same initial cell and solver: only the predicted z0 differs, and it must save evaluations.
    plain, skip = data["models"]["DEQ"]["nfe"], data["models"]["Skip DEQ"]["nfe"]
    assert sum(skip) < sum(plain)
