"""The original implementations, built from the user's checkouts at run time for ``compare_original.py``.

Nothing of theirs is copied here: each builder puts a checkout on ``sys.path``, changes into the folder it
resolves its imports and configs from, and builds the model as its own training script does. They run as
shipped, except for the run-time patches of :func:`patch_runtime` (applied before their import, never to
their files), which only replace what this torch/numpy no longer has or what needs CUDA.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

# What each ``--flag`` checkout must contain to be the expected repository.
MARKERS = {"mdeq": "lib/models/mdeq.py", "deq": "DEQ-Sequence/models/deq_transformer.py",
           "zoo": "deq-zoo/mdeq/mdeq_cifar/mdeq/models/mdeq.py"}
# locuslab/mdeq and locuslab/deq's checkpoints alias the cell as ``deq.func(_copy).*`` and keep a frozen
# ``fullstage_copy`` that their forward overwrites from ``fullstage``: no weights of their own to load.
ALIASES = ("fullstage_copy.", "deq.")


def patch_runtime() -> None:
    """Make the originals run on this torch/numpy without CUDA: ``np.int`` (removed in numpy 1.24; locuslab/mdeq's
    seg head sizes its last layer with it), ``torch.solve(b, A)`` (removed in torch 2; locuslab/deq's Anderson
    calls it) as ``torch.linalg.solve(A, b)``, and ``torch.cuda.synchronize`` a no-op without CUDA (locuslab/deq's
    backward hooks call it unconditionally)."""
    if not hasattr(np, "int"):
        np.int = int
    if torch.solve.__module__ == "torch._linalg_utils":  # the stub that raises "removed"
        torch.solve = lambda b, a: (torch.linalg.solve(a, b), None)
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *args, **kwargs: None


def counting(solver: Callable, counts: dict[str, int], key: Callable[[dict], str]) -> Callable:
    """``solver`` whose f evaluations are added to ``counts[key(kwargs)]`` (the originals report steps, not
    evaluations)."""
    def run(f: Callable, x0: Any, *args: Any, **kwargs: Any) -> Any:
        def f_counted(z: Any) -> Any:
            counts[key(kwargs)] += 1
            return f(z)
        return solver(f_counted, x0, *args, **kwargs)
    return run


def load_plain(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load one of our state dicts into an original model: the same keys but for the original's aliases."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(ALIASES) for k in missing):
        raise RuntimeError(f"the original's layout differs: unexpected {unexpected}, missing "
                           f"{[k for k in missing if not k.startswith(ALIASES)]}")


def _mdeq_config(root: str, config_file: str, f_thres: int) -> Any:
    """locuslab/mdeq's yacs config from ``config_file`` at F_THRES = B_THRES = ``f_thres``, dropout off."""
    sys.path[:0] = [f"{root}/lib", f"{root}/lib/models", f"{root}/lib/modules"]
    os.chdir(root)  # the original resolves some imports and paths from its root
    from config import config  # noqa: E402  (the original's yacs defaults)

    config.defrost()
    config.merge_from_file(config_file)
    config.MODEL.F_THRES, config.MODEL.B_THRES, config.MODEL.DROPOUT = f_thres, f_thres, 0.0
    config.freeze()
    return config


def mdeq_cls(root: str, config_file: str, f_thres: int, retain: bool = False):
    """locuslab/mdeq's classifier; ``retain``: with our CPU allocator setting."""
    if retain:
        from deqlab.utils.cpu_allocator import retain_freed_memory
        retain_freed_memory()
    config = _mdeq_config(root, config_file, f_thres)
    import models  # noqa: E402

    torch.manual_seed(0)
    model = models.mdeq.get_cls_net(config)

    def forward(x):
        out = model(x, train_step=10**9, f_thres=f_thres, b_thres=f_thres)
        return out[0] if isinstance(out, (tuple, list)) else out
    return model, forward


def mdeq_seg(root: str, config_file: str, f_thres: int, counts: dict[str, int]) -> tuple[nn.Module, Callable]:
    """locuslab/mdeq's segmenter and ``loss(x, labels, train_step)`` with its own criterion (upsampled
    cross-entropy, ignore label 255) and the Cityscapes class weights. Its Broyden runs ``f_thres`` steps both
    ways (the backward takes the forward's threshold); ``counts['fwd'|'bwd']`` get its f evaluations."""
    from deqlab.segmentation.losses import CITYSCAPES_CLASS_WEIGHTS

    patch_runtime()
    config = _mdeq_config(root, config_file, f_thres)
    import models  # noqa: E402
    from core.seg_criterion import CrossEntropy  # noqa: E402

    # MDEQWrapper's DEQFunc2d and Backward call modules.deq2d's broyden by name: count there.
    deq2d = sys.modules["modules.deq2d"]
    deq2d.broyden = counting(deq2d.broyden, counts, lambda kw: "fwd" if kw.get("name") == "forward" else "bwd")
    model = models.mdeq.get_seg_net(config)
    criterion = CrossEntropy(ignore_label=255, weight=torch.tensor(CITYSCAPES_CLASS_WEIGHTS))

    def loss(x, labels, train_step):
        return criterion(model(x, train_step=train_step, f_thres=f_thres), labels)
    return model, loss


def deq_transformer(root: str, kwargs: dict[str, Any], f_thres: int, counts: dict[str, int],
                    f_solver: str = "anderson", eps: float | None = None) -> tuple[nn.Module, Callable]:
    """locuslab/deq's DEQ-Transformer (``DEQ-Sequence``) from the original's keyword arguments, ``f_solver``
    forward (Anderson as in ``wt103_deq_transformer.sh``, or Broyden) and Broyden backward, both at ``f_thres``,
    and ``loss(data, target, mems, train_step)`` (the mean per-token NLL); ``counts`` get its f evaluations.
    ``eps``: both solvers' relative tolerance (default their own, 1e-3: the model passes none)."""
    patch_runtime()
    sys.path[:0] = [f"{root}/DEQ-Sequence", root]
    os.chdir(Path(root) / "DEQ-Sequence")
    from lib.solvers import anderson, broyden  # noqa: E402  (locuslab/deq's lib/, not ours)
    from models.deq_transformer import DEQTransformerLM  # noqa: E402

    tol = {} if eps is None else {"eps": eps}
    forward = functools.partial({"anderson": anderson, "broyden": broyden}[f_solver], **tol)
    model = DEQTransformerLM(**kwargs, f_solver=counting(forward, counts, lambda kw: "fwd"),
                             b_solver=counting(functools.partial(broyden, **tol), counts, lambda kw: "bwd"),
                             logging=lambda *args: None)

    def loss(data, target, mems, train_step):
        out = model(data, target, list(mems), train_step=train_step, f_thres=f_thres, b_thres=f_thres,
                    compute_jac_loss=False)  # a fresh list: its forward permutes the entries in place
        return out[0].mean()
    return model, loss


def deq_vision(root: str, f_thres: int):
    """locuslab/deq's MDEQ-Vision (the later MDEQ code: its own solvers and Jacobian regulariser, off here)."""
    vision = Path(root) / "MDEQ-Vision"
    sys.path[:0] = [str(vision / "lib")]
    os.chdir(vision)  # it appends "lib/", "lib/models" and "../" (for the repository's lib/) to sys.path
    patch_runtime()
    from config import config  # noqa: E402  (MDEQ-Vision's yacs defaults)
    import models  # noqa: E402

    config.defrost()
    config.merge_from_file("experiments/cifar/cls_mdeq_TINY.yaml")
    config.DEQ.F_THRES, config.DEQ.B_THRES, config.MODEL.DROPOUT = f_thres, f_thres, 0.0
    config.freeze()
    torch.manual_seed(0)
    model = models.mdeq.get_cls_net(config)

    def forward(x):
        return model(x, train_step=10**9, compute_jac_loss=False, f_thres=f_thres, b_thres=f_thres)[0]
    return model, forward


def zoo(root: str, f_thres: int):
    """The torchdeq zoo's MDEQ (deq-zoo/mdeq/mdeq_cifar, needs ``pip install torchdeq``) with run_small.sh's
    flags: weight norm, Broyden forward at ``f_thres``, phantom gradient of 5 steps with tau 0.5."""
    import argparse

    from torchdeq.utils import add_deq_args

    cifar = Path(root) / "deq-zoo/mdeq/mdeq_cifar"
    sys.path[:0] = [str(cifar / "mdeq")]
    os.chdir(cifar)
    from config import config  # noqa: E402  (the zoo's yacs defaults)
    import models  # noqa: E402

    parser = argparse.ArgumentParser()
    add_deq_args(parser)
    args = parser.parse_args(["--norm_type", "weight_norm", "--f_solver", "broyden", "--f_max_iter", str(f_thres),
                              "--grad", "5", "--tau", "0.5"])
    config.defrost()
    config.merge_from_file("configs/small.yaml")
    config.freeze()
    torch.manual_seed(0)
    model = models.mdeq.get_cls_net(config, args)

    def forward(x):
        out = model(x, train_step=10**9)
        return out[-1] if isinstance(out, list) else out  # training: one output per supervised state (one)
    return model, forward
