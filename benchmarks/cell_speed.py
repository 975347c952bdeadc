"""The DEQ cells of all three tasks: f without autograd, f with its graph, and one VJP, per speed setting.

    python benchmarks/cell_speed.py [--tasks cls seg lm] [--variants system retain compile nhwc nhwc_compile]
                                    [--repeats 10] [--out benchmarks/results/cell_speed.json]

The solver's cost is these three calls times the budget: a forward solve is F_THRES no-grad f evaluations, the
implicit backward one f with a graph and B_THRES VJPs. Cells, at the sizes of the other benchmarks: ``cls``
MDEQ-TINY (``experiments/cifar/cls_mdeq_TINY.yaml``, batch 32, 32×32), ``seg`` MDEQ-SMALL segmentation
(``experiments/cityscapes/seg_mdeq_SMALL.yaml``, batch 2, a 512×256 crop), ``lm`` the DEQ-Transformer of
``lm_step.py`` (d_model 140, d_inner 2000, 8 streams of 64 tokens with a 64-token memory). Train mode, dropout
off. Variants, each in a fresh process (the allocator setting is process-wide): ``system`` (glibc's malloc as
it is), ``retain`` (``CPU_ALLOCATOR retain``, the default), ``compile`` (retain + ``MODEL.COMPILE``: the no-grad
call compiled, the other two eager, as in training), ``nhwc`` and ``nhwc_compile`` (retain +
``MODEL.CHANNELS_LAST``, MDEQ only). The cell's inputs are taken from a real forward pass of the model (its
DEQ layer is swapped for one that records f and z0 and stops the pass). Medians over ``--repeats`` calls on a
pool of distinct states; ``compile_s`` is the first no-grad call's extra time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"system": ["CPU_ALLOCATOR", "system"], "retain": [], "compile": ["MODEL.COMPILE", "True"],
            "nhwc": ["MODEL.CHANNELS_LAST", "True"],
            "nhwc_compile": ["MODEL.CHANNELS_LAST", "True", "MODEL.COMPILE", "True"]}
MDEQ_ONLY = ("nhwc", "nhwc_compile")


class _Recorded(Exception):
    pass


class RecordCell(nn.Module):
    """Stands in for a model's DEQ layer: keeps the cell f and the initial state, then stops the forward."""

    def forward(self, f, z0, **_):
        self.f, self.z0 = f, z0
        raise _Recorded


def build(task: str, overrides: list[str]):
    """(model, a function running one forward pass of it) for ``task`` with the variant's ``overrides``."""
    from deqlab.config import load_config
    from deqlab.models import MODELS, build_model
    from deqlab.utils.cpu_allocator import configure_cpu_allocator

    # NCHW unless the variant says NHWC (MODEL.CHANNELS_LAST's default, "auto", would take NHWC on the CPU)
    common = ["MODEL.DROPOUT", "0.0", "TRAIN.PRETRAIN_STEPS", "0", "MODEL.CHANNELS_LAST", "False", *overrides]
    torch.manual_seed(0)
    if task == "lm":
        cfg = load_config(REPO / "experiments/wikitext103/deq_transformer.yaml", [
            "MODEL.TRANSFORMER.D_MODEL", "140", "MODEL.TRANSFORMER.D_EMBED", "140", "MODEL.TRANSFORMER.D_HEAD", "14",
            "MODEL.TRANSFORMER.D_INNER", "2000", "MODEL.TRANSFORMER.CUTOFFS", "[2000, 4000, 20000]",
            "LM.TGT_LEN", "64", "LM.MEM_LEN", "64", *common])
        configure_cpu_allocator(cfg.CPU_ALLOCATOR)
        model = MODELS["lm"]["deq_transformer"](cfg, n_token=30000).train()
        tokens = torch.randint(0, 30000, (129, 8))
        mems = [m.detach() for m in model(tokens[:64], tokens[1:65], train_step=10**9)[1]]
        return model, lambda: model(tokens[64:128], tokens[65:], mems=mems, train_step=10**9)
    config = {"cls": "experiments/cifar/cls_mdeq_TINY.yaml", "seg": "experiments/cityscapes/seg_mdeq_SMALL.yaml"}
    cfg = load_config(REPO / config[task], common)
    configure_cpu_allocator(cfg.CPU_ALLOCATOR)
    model = build_model(cfg, task=task).train()
    x = torch.randn(32, 3, 32, 32) if task == "cls" else torch.randn(2, 3, 256, 512)
    return model, lambda: model(x, train_step=10**9)


def measure(task: str, variant: str, repeats: int) -> dict:
    from deqlab.deq import pack, unpack

    model, forward = build(task, VARIANTS[variant])
    model.deq = RecordCell()
    try:
        forward()
    except _Recorded:
        pass
    f, z0 = model.deq.f, model.deq.z0
    flat0, layout = pack(z0)
    pool = [unpack(flat0 + torch.randn_like(flat0), layout) for _ in range(4)]

    def timed(fn, n):
        out = []
        for i in range(n):
            start = time.perf_counter()
            fn(i)
            out.append(time.perf_counter() - start)
        return out

    with torch.no_grad():
        first = timed(lambda i: f(pool[0]), 1)[0]
        no_grad = timed(lambda i: f(pool[i % 4]), repeats + 1)[1:]
    z_in = pack(pool[0])[0].requires_grad_()
    fz = pack(f(unpack(z_in, layout)), layout)[0]
    graph = timed(lambda i: pack(f(unpack(z_in, layout)), layout)[0], repeats)
    grads = [torch.randn_like(fz) for _ in range(4)]
    vjp = timed(lambda i: torch.autograd.grad(fz, z_in, grads[i % 4], retain_graph=True), repeats + 1)[1:]
    ms = {k: 1e3 * statistics.median(v) for k, v in (("f_no_grad_ms", no_grad), ("f_graph_ms", graph),
                                                     ("vjp_ms", vjp))}
    return {"task": task, "variant": variant, **ms, "compile_s": first - ms["f_no_grad_ms"] / 1e3,
            "state_mb": flat0.numel() * 4 / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["cls", "seg", "lm"], choices=["cls", "seg", "lm"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/cell_speed.json"))
    parser.add_argument("--child", nargs=2, metavar=("TASK", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.repeats)))
        return
    print(f"{'task':<4} {'variant':<13} {'f no grad ms':>12} {'f graph ms':>10} {'VJP ms':>8} {'vs system':>22} "
          f"{'compile s':>9}")
    rows = []
    for task in args.tasks:
        base = None
        for variant in args.variants:
            if task == "lm" and variant in MDEQ_ONLY:
                continue
            cmd = [sys.executable, __file__, "--child", task, variant, "--repeats", str(args.repeats)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"error: {task}/{variant} failed: {proc.stderr.strip().splitlines()[-1]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            base = base or row
            ratios = "/".join(f"{row[k] / base[k]:.2f}" for k in ("f_no_grad_ms", "f_graph_ms", "vjp_ms"))
            print(f"{task:<4} {variant:<13} {row['f_no_grad_ms']:>12.1f} {row['f_graph_ms']:>10.1f} "
                  f"{row['vjp_ms']:>8.1f} {ratios:>22} {row['compile_s']:>9.1f}", flush=True)
            rows.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "torch": torch.__version__}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
