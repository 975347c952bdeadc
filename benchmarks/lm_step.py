"""DEQ-Transformer (WT103 architecture, reduced width) training-step speed and memory per gradient mode and budget.

    python benchmarks/lm_step.py [--steps 3] [--batch 8] [--tgt-len 64] [--d-model 140] [--d-inner 2000]
                                 [--f-thres 10 20 30] [--modes ift phantom unrolled] [--out benchmarks/results/lm_step.json]

``experiments/wikitext103/deq_transformer.yaml`` (10 heads, adaptive embedding and softmax with div_val 4, weight
norm, Anderson forward / Broyden backward, B_THRES 35) with the width cut to ``--d-model`` (heads of
d_model / 10) and ``--d-inner``, a 30,000-token vocabulary (cutoffs 2,000 / 4,000 / 20,000) and random tokens;
``--batch`` streams of ``--tgt-len`` tokens with as much memory. Dropout off and a forward tolerance of 0, so every
solve spends its whole budget. The same memory measures as ``train_step.py``; each setting in a fresh process.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from train_step import MODES, REPO, measure_steps, memory_growth, run_grid

CONFIG = REPO / "experiments/wikitext103/deq_transformer.yaml"
N_TOKEN = 30000


def measure(mode: str, f_thres: int, batch: int, tgt_len: int, d_model: int, d_inner: int, steps: int,
            device: str) -> dict:
    from deqlab.config import load_config
    from deqlab.models import MODELS

    cfg = load_config(CONFIG, ["DEQ.GRAD", mode, "DEQ.F_THRES", str(f_thres), "DEQ.F_EPS", "0.0",
                               "TRAIN.PRETRAIN_STEPS", "0", "MODEL.DROPOUT", "0.0",
                               "MODEL.TRANSFORMER.D_MODEL", str(d_model), "MODEL.TRANSFORMER.D_EMBED", str(d_model),
                               "MODEL.TRANSFORMER.D_HEAD", str(d_model // 10), "MODEL.TRANSFORMER.D_INNER", str(d_inner),
                               "MODEL.TRANSFORMER.CUTOFFS", "[2000, 4000, 20000]", "LM.TGT_LEN", str(tgt_len),
                               "LM.MEM_LEN", str(tgt_len)])
    torch.manual_seed(0)
    dev = torch.device(device)
    model = MODELS["lm"]["deq_transformer"](cfg, n_token=N_TOKEN).to(dev).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.TRAIN.LR)
    tokens = torch.randint(0, N_TOKEN, (2 * tgt_len + 1, batch), device=dev)
    _, mems, _ = model(tokens[:tgt_len], tokens[1:tgt_len + 1], mems=None, train_step=10**9, f_thres=f_thres)
    mems = [m.detach() for m in mems]  # a full memory, as every segment after the first has
    data, target = tokens[tgt_len:2 * tgt_len], tokens[tgt_len + 1:]

    def loss_and_info() -> tuple[torch.Tensor, dict]:
        loss, _, info = model(data, target, mems=mems, train_step=10**9, f_thres=f_thres)
        return loss.mean(), info

    run = measure_steps(loss_and_info, optimizer, dev, steps)
    info = run["info"]
    return {"mode": mode, "f_thres": f_thres, "batch": batch, "tgt_len": tgt_len, "d_model": d_model,
            "d_inner": d_inner, "device": device, "step_s": run["step_s"],
            "tokens_per_s": batch * tgt_len / run["step_s"], "fwd_steps": info["fwd"]["nstep"],
            "fwd_nfe": info["fwd"]["nfe"], "bwd_steps": info["bwd"].get("nstep", 0),
            "bwd_nfe": info["bwd"].get("nfe", 0), "saved_for_backward_mb": run["saved_for_backward_mb"],
            "peak_step_mb": run["peak_step_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tgt-len", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=140)
    parser.add_argument("--d-inner", type=int, default=2000)
    parser.add_argument("--f-thres", type=int, nargs="+", default=[10, 20, 30])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/lm_step.json"))
    parser.add_argument("--child", nargs=2, metavar=("MODE", "F_THRES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.batch, args.tgt_len, args.d_model,
                                 args.d_inner, args.steps, args.device)))
        return
    rows = run_grid(__file__, args.modes, args.f_thres, "tokens_per_s", "tokens/s",
                    ["--batch", str(args.batch), "--tgt-len", str(args.tgt_len), "--d-model", str(args.d_model),
                     "--d-inner", str(args.d_inner), "--steps", str(args.steps), "--device", args.device])
    growth, targets = memory_growth(rows, args.modes, args.f_thres)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": str(CONFIG.relative_to(REPO)), "rows": rows, "growth": growth,
                                          "targets": targets, "torch": torch.__version__}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
