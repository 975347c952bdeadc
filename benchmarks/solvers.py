"""Fixed-point solver benchmark: f evaluations, residuals and per-step overhead, forward and IFT backward.

Problems (float32, z0 = 0, tol 1e-4 relative per sample, at most 100 f evaluations, fixed seeds):

* ``lin_tanh``      z = tanh(W z + U x), B=32, D=512, W Gaussian rescaled to spectral norm 0.9;
* ``lin_tanh_hard`` as above with W symmetric, spectral norm 0.95, and U x scaled by 0.1 (nearly linear);
* ``conv_gn``       z = GroupNorm(4, 16)(relu(conv3x3(z) + x)) on (32, 16, 32, 32), conv without bias.

Forward: the solve of z = f(z) under ``no_grad``. Backward: the IFT adjoint solve g = g J + v at a z* shared by
all solvers (v random), one VJP ``torch.autograd.grad(fz, z_in, g, retain_graph=True)`` per step, as in
``deqlab.DEQ``'s backward hook. NFE counts calls of f (or of the VJP); the residual is recomputed from the
returned iterate. ``overhead = solve time / (NFE x median time of one f call)`` (or one VJP): 1.0 means the
solver costs nothing beyond its function evaluations. Solve times: warmup 1, median of ``--repeats``; after
each timed solve NFE single calls are timed (same machine load) on distinct inputs cycled from a pool, as in
a solve, and their median is the call time (see ``measure``). If ``torchdeq`` imports, its solvers run
beside ours as ``torchdeq/<name>`` (reference only; the targets apply to ours).

Memory-traffic floor: our solvers' own work per step (everything but f) is a fixed number of passes over
(B, N) float32 vectors, counted from their code in ``traffic``: elementwise passes and passes over the stored
history (Broyden: 4 per stored pair, Anderson: 2 per window row). Bandwidth is measured on each problem's state
size: an elementwise add cycling over distinct vectors, and a bmm reading a 20-row history as Broyden's
products do. ``floor = bytes / bandwidth`` per step, against the measured ``(solve − NFE × call) / NFE``.

Run: ``python benchmarks/solvers.py [--repeats 5] [--problems a,b] [--solvers a,b] [--out PATH]``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from deqlab.solvers import budget_for_evals, get_solver

Fn = Callable[[Tensor], Tensor]
TOL, MAX_NFE = 1e-4, 100  # the cap is in f evaluations: Broyden's budget is one less (it also evaluates f(z0))
POOL = 8  # distinct inputs the reference f / VJP calls cycle through (16 MB for conv_gn, twice the L3 here)
OURS = ("broyden", "anderson", "fixed_point")
TORCHDEQ = {"broyden": "broyden", "anderson": "anderson", "fixed_point": "fixed_point_iter"}
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "solvers.json"


def _rescaled(w: Tensor, norm: float) -> Tensor:
    return w * (norm / torch.linalg.matrix_norm(w, ord=2))


def lin_tanh(hard: bool = False, b: int = 32, d: int = 512) -> tuple[Fn, Tensor]:
    """z = tanh(W z + U x); ``hard``: symmetric W with norm 0.95 and the input scaled by 0.1."""
    torch.manual_seed(1 if hard else 0)
    w = torch.randn(d, d)
    w = _rescaled(w + w.T, 0.95) if hard else _rescaled(w, 0.9)
    u = torch.randn(d, d) / d ** 0.5
    inj = torch.randn(b, d) @ u.T * (0.1 if hard else 1.0)
    wt = w.T.contiguous()
    return (lambda z: torch.tanh(torch.addmm(inj, z, wt))), torch.zeros(b, d)


def conv_gn(b: int = 32, c: int = 16, hw: int = 32) -> tuple[Fn, Tensor]:
    """z = GroupNorm(4, c)(relu(conv3x3(z) + x)) with default init (parameters require grad, as in a model)."""
    torch.manual_seed(2)
    conv, norm = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.GroupNorm(4, c)
    x = torch.randn(b, c, hw, hw)
    return (lambda z: norm(torch.relu(conv(z) + x))), torch.zeros(b, c, hw, hw)


PROBLEMS: dict[str, Callable[[], tuple[Fn, Tensor]]] = {
    "lin_tanh": lin_tanh, "lin_tanh_hard": lambda: lin_tanh(hard=True), "conv_gn": conv_gn}


def make_solver(label: str) -> Callable[[Fn, Tensor], Tensor]:
    """``solve(f, z0) -> z`` at the benchmark's tol and at most MAX_NFE f evaluations for ``name`` or
    ``torchdeq/name`` (torchdeq's ``max_iter`` has our units)."""
    name = label.split("/", 1)[-1]
    max_iter = budget_for_evals(name, MAX_NFE)
    if label.startswith("torchdeq/"):
        from torchdeq.solver import get_solver as td_get_solver
        td = td_get_solver(name)
        return lambda f, z0: td(f, z0, max_iter=max_iter, tol=TOL, stop_mode="rel")[0]
    ours = get_solver(name)
    return lambda f, z0: ours(f, z0, max_iter=max_iter, tol=TOL, stop_mode="rel")[0]


def median_time(fn: Callable[[], Any], repeats: int, warmup: bool = True) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls (after one warmup call)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def max_rel_residual(f: Fn, z: Tensor) -> float:
    fz = f(z)
    return ((fz - z).flatten(1).norm(dim=1) / (fz.flatten(1).norm(dim=1) + 1e-8)).max().item()


def measure(solve: Callable[[Fn, Tensor], Tensor], f: Fn, z0: Tensor, repeats: int, pool: list[Tensor],
            call: Fn | None = None) -> dict:
    """NFE, convergence, residual, median solve time and overhead of ``solve`` on z = f(z) (under no_grad).

    The reference is ``call`` (default f; the bare VJP for the adjoint) applied to the inputs of ``pool`` in
    turn: distinct tensors, as in a solve, where f never sees the same input twice (the same input over and
    over stays in cache and times f faster than any solve can run it). After each timed solve NFE single
    calls are timed right away, so that the solve and its reference see the same machine load; the call time
    is the median of all of them. ``call_ms_warm`` (same input every call) is recorded for reference.
    """
    call = f if call is None else call
    calls = [0]

    def counted(z: Tensor) -> Tensor:
        calls[0] += 1
        return f(z)

    with torch.no_grad():
        z = solve(counted, z0)  # also the warmup of the timing below
        nfe, rel = calls[0], max_rel_residual(f, z)
        t_solve, t_call = [], []
        for _ in range(repeats):
            t_solve.append(median_time(lambda: solve(f, z0), 1, warmup=False))
            t_call += [median_time(lambda: call(pool[i % len(pool)]), 1, warmup=False) for i in range(nfe)]
        t_warm = median_time(lambda: call(pool[0]), max(nfe, 5))
    t_s, t_c = statistics.median(t_solve), statistics.median(t_call)
    return {"nfe": nfe, "converged": bool(rel <= TOL), "rel_residual": rel, "time_ms": 1e3 * t_s,
            "call_ms": 1e3 * t_c, "call_ms_warm": 1e3 * t_warm, "overhead": t_s / (nfe * t_c)}


def traffic(solver: str, nfe: int, window: int = 5) -> tuple[int, int] | None:
    """(elementwise, history) passes over one state vector for a solve of ``nfe`` evaluations by our ``solver``
    (defaults: Broyden's full memory, Anderson's window 5); None for a solver without a count.

    Counted from the no-grad code paths, a read or a write of one (B, N) vector being one pass:
    fixed_point, per step: the residual f(z) − z (3) and its two norms (2). anderson, step j with
    n = min(j + 1, m) rows: residual (3), norms (2), the copy of f(x) into the ring (2), the Gram row
    (g in: 1, n rows) and the mixing (n rows, x out: 1); the last step stops after the norms. broyden: the
    first evaluation (residual 3, norms 2, first step 2), then with n stored pairs: z + Δz (3), residual (3),
    norms (2), the four history products (vectors in/out 4, two subtractions 6; history 4n; without pairs two
    negations, 4 in all), the update and next step (13); the last step stops after the norms (8 in all).
    """
    if solver == "fixed_point":
        return 5 * nfe, 0
    if solver == "anderson":
        return 9 * (nfe - 1) + 5, sum(2 * min(j + 1, window) for j in range(nfe - 1))
    if solver == "broyden":
        steps = range(nfe - 2)  # full steps, with k stored pairs at step k (memory >= max_iter here)
        return 7 + sum(21 + (10 if k else 4) for k in steps) + 8 * (nfe > 1), sum(4 * k for k in steps)
    return None


def bandwidth(state: Tensor, repeats: int = 20) -> tuple[float, float]:
    """(elementwise, history) bytes/s on vectors of ``state``'s size: ``add(a, b, out=c)`` over distinct
    vectors, and the bmm of one vector with a 20-row slot-major history (Broyden's layout)."""
    flat = state.reshape(state.shape[0], -1)
    pool = [torch.randn_like(flat) for _ in range(POOL)]
    out = torch.empty_like(flat)
    nbytes = flat.numel() * flat.element_size()
    t_add = median_time(lambda: [torch.add(pool[i], pool[i + 1], out=out) for i in range(POOL - 1)], repeats)
    hist = torch.randn(20, *flat.shape).transpose(0, 1)  # (B, 20, N) view of (20, B, N) slots
    t_bmm = median_time(lambda: torch.bmm(flat.unsqueeze(1), hist.transpose(1, 2)), repeats)
    return 3 * nbytes * (POOL - 1) / t_add, 20 * nbytes / t_bmm


def add_floor(row: dict, state: Tensor, bw: tuple[float, float]) -> None:
    """Per direction: our solver's measured ms per step beyond f, its memory-traffic floor and their ratio."""
    nbytes = state.numel() * state.element_size()
    for k in ("fwd", "bwd"):
        m = row[k]
        m["solver_ms_per_step"] = (m["time_ms"] - m["nfe"] * m["call_ms"]) / m["nfe"]
        passes = traffic(row["solver"], m["nfe"])
        m["floor_ms_per_step"] = None if passes is None else \
            1e3 * nbytes * (passes[0] / bw[0] + passes[1] / bw[1]) / m["nfe"]


def adjoint(f: Fn, z_star: Tensor) -> tuple[Fn, Fn, Tensor]:
    """The backward problem at z*: (vjp, g -> vjp(g) + v, zeros), as DEQ's ift hook sets it up."""
    torch.manual_seed(3)
    z_in = z_star.detach().requires_grad_()
    with torch.enable_grad():
        fz = f(z_in)
    v = torch.randn_like(fz)

    def vjp(g: Tensor) -> Tensor:
        return torch.autograd.grad(fz, z_in, g, retain_graph=True)[0]

    return vjp, (lambda g: vjp(g) + v), torch.zeros_like(v)


def run(problems: list[str], solvers: list[str], repeats: int) -> list[dict]:
    rows = []
    for pname in problems:
        f, z0 = PROBLEMS[pname]()
        with torch.no_grad():  # one accurate z* shared by every solver's backward problem
            z_star, _ = get_solver("anderson")(f, z0, max_iter=300, tol=1e-6, stop_mode="rel")
            f_pool = [f(z0)]
            for _ in range(POOL - 1):  # the first iterates of a plain iteration: realistic, distinct inputs
                f_pool.append(f(f_pool[-1]))
        vjp, f_adj, g0 = adjoint(f, z_star)
        g_pool = [torch.randn_like(g0) for _ in range(POOL)]
        bw = bandwidth(z0)
        print(f"  {pname}: state {z0.numel() * 4 / 2**20:.1f} MB, bandwidth {bw[0] / 1e9:.1f} GB/s elementwise, "
              f"{bw[1] / 1e9:.1f} GB/s history", flush=True)
        for label in solvers:
            solve = make_solver(label)
            row = {"problem": pname, "solver": label,
                   "fwd": measure(solve, f, z0, repeats, f_pool),
                   "bwd": measure(solve, f_adj, g0, repeats, g_pool, vjp),
                   "bandwidth_gbs": [b / 1e9 for b in bw]}
            add_floor(row, z0, bw)
            rows.append(row)
            print(f"  done {pname:<14} {label:<25} fwd nfe {row['fwd']['nfe']:>3}  bwd nfe {row['bwd']['nfe']:>3}",
                  flush=True)
    return rows


def targets(rows: list[dict]) -> dict[str, dict[str, Any]]:
    """Per problem: the checks that apply (ours only) and whether each holds; missing rows count as unmet."""
    by = {(r["problem"], r["solver"]): r for r in rows}
    out: dict[str, dict[str, Any]] = {}
    for pname in dict.fromkeys(r["problem"] for r in rows):
        checks: dict[str, bool] = {}
        for s in ("broyden", "anderson"):
            r = by.get((pname, s))
            checks[f"{s} converges fwd+bwd"] = bool(r and r["fwd"]["converged"] and r["bwd"]["converged"])
        if pname == "lin_tanh_hard":
            r = by.get((pname, "anderson"))
            checks["anderson fwd NFE <= 40"] = bool(r and r["fwd"]["nfe"] <= 40)
        if pname == "conv_gn":
            for s, limit in (("anderson", 1.2), ("broyden", 1.3)):
                r = by.get((pname, s))
                checks[f"{s} overhead <= {limit} fwd+bwd"] = bool(
                    r and r["fwd"]["overhead"] <= limit and r["bwd"]["overhead"] <= limit)
        out[pname] = {"checks": checks, "met": all(checks.values())}
    return out


def print_table(rows: list[dict], met: dict[str, dict[str, Any]]) -> None:
    head = (f"{'problem':<14} {'solver':<25} | {'NFE':>4} {'conv':>4} {'rel.res':>8} {'ms':>8} {'ovh':>5} | "
            f"{'NFE':>4} {'conv':>4} {'rel.res':>8} {'ms':>8} {'ovh':>5} | target met")
    print(f"{'':<40} | {'forward (no_grad)':^33} | {'backward (ift adjoint)':^33} |")
    print(head)
    print("-" * len(head))
    last = None
    for r in rows:
        p = r["problem"]
        if last is not None and p != last:
            print("-" * len(head))
        cells = [f"{r[k]['nfe']:>4} {'yes' if r[k]['converged'] else 'NO':>4} {r[k]['rel_residual']:>8.1e} "
                 f"{r[k]['time_ms']:>8.2f} {r[k]['overhead']:>5.2f}" for k in ("fwd", "bwd")]
        flag = ("yes" if met[p]["met"] else "NO") if p != last else ""
        print(f"{p if p != last else '':<14} {r['solver']:<25} | {cells[0]} | {cells[1]} | {flag}")
        last = p
    print("-" * len(head))
    print(f"\n{'problem':<14} {'solver':<12} | {'solver ms/step':>14} {'floor ms':>9} {'x floor':>7} | "
          f"{'solver ms/step':>14} {'floor ms':>9} {'x floor':>7}   (forward | backward; ours)")
    for r in rows:
        if r["fwd"].get("floor_ms_per_step") is None:
            continue
        cells = [f"{r[k]['solver_ms_per_step']:>14.3f} {r[k]['floor_ms_per_step']:>9.3f} "
                 f"{r[k]['solver_ms_per_step'] / r[k]['floor_ms_per_step']:>7.2f}" for k in ("fwd", "bwd")]
        print(f"{r['problem']:<14} {r['solver']:<12} | {cells[0]} | {cells[1]}")
    print()
    for p, m in met.items():
        bad = [k for k, ok in m["checks"].items() if not ok]
        print(f"{p:<14} target {'met' if m['met'] else 'MISSED'}: " + ("; ".join(m["checks"]) if not bad else
                                                                      "failed: " + "; ".join(bad)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    ap.add_argument("--repeats", type=int, default=5, help="timed solves per cell (median; after 1 warmup)")
    ap.add_argument("--problems", default=",".join(PROBLEMS), help="comma list of " + ", ".join(PROBLEMS))
    ap.add_argument("--solvers", default=",".join(OURS),
                    help="comma list of ours (" + ", ".join(OURS) + "); torchdeq's run beside them if installed")
    args = ap.parse_args(argv)
    problems, solvers = args.problems.split(","), args.solvers.split(",")
    for p in problems:
        if p not in PROBLEMS:
            ap.error(f"unknown problem {p!r}; known: {', '.join(PROBLEMS)}")
    for s in solvers:
        get_solver(s)  # raises with the list of known solvers
    try:
        import torchdeq  # noqa: F401
        solvers += [f"torchdeq/{TORCHDEQ[s]}" for s in solvers if s in TORCHDEQ]
        td_version = getattr(torchdeq, "__version__", "installed")
    except ImportError:
        td_version = None
        print("note: torchdeq is not installed (pip install torchdeq==0.1.0); comparing our solvers only")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, tol {TOL} rel, at most {MAX_NFE} f evals, "
          f"repeats {args.repeats}")
    rows = run(problems, solvers, args.repeats)
    met = targets(rows)
    print_table(rows, met)
    n_met = sum(m["met"] for m in met.values())
    print(f"SUMMARY: targets met on {n_met}/{len(met)} problems"
          + ("" if n_met == len(met) else " (missed: " + ", ".join(p for p, m in met.items() if not m["met"]) + ")"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "processor": platform.processor(), "torchdeq": td_version, "tol": TOL, "max_nfe": MAX_NFE,
            "repeats": args.repeats}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows, "targets": met}, indent=2))
    print(f"wrote {args.out}")
    return 0 if n_met == len(met) else 1


if __name__ == "__main__":
    raise SystemExit(main())
