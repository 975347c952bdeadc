"""Weights of the torchdeq zoo's MDEQ (locuslab/torchdeq ``deq-zoo/mdeq``) in deqlab's layout.

The checkpoint format ``zoo`` (``MODEL.WEIGHTS_FORMAT``, detected from the keys when ``auto``) names the files
that the zoo's ``mdeq_cifar/main.py`` (a plain state_dict, or ``{'state_dict': ...}`` in its training checkpoint)
and ``mdeq_imagenet/train_mdeq_imagenet.py`` (``{'epoch', 'state_dict', 'best_acc1', 'optimizer'}`` of a DDP
model: every key starts with ``module.``, which ``deqlab.checkpoint`` strips as for any file) write. They hold
the same tensors as locuslab/mdeq's and ours, except:

- the cell is ``full_stage.*`` (ours and locuslab/mdeq: ``fullstage.*``);
- torchdeq's ``apply_norm`` normalises another set of convs: the zoo's CIFAR models also the fusion convs, its
  ImageNet model only the residual blocks (its ``filter_out='fuse_layers'`` also matches ``post_fuse_layers``).
  The zoo configs under ``experiments/`` build exactly that layout (``MODEL.NORM_LAYERS``), so nothing is
  converted but names. Loaded into a model whose normalisation covers other convs, a weight-normalised conv of the
  file is folded into a plain weight, w = v · g / ||v|| (norm over every dim but 0), and a plain conv of the file
  is split into weight norm's pair, g = ||w||, v = w: both give the same function. Spectral-norm files
  (``--norm_type spectral_norm``) have torchdeq's names, which are ours: they load into ``NORM_TYPE
  spectral_norm`` models as they are.
"""
from __future__ import annotations

from typing import Mapping

from torch import Tensor

ZOO_CELL, OUR_CELL = "full_stage.", "fullstage."


def is_zoo_state(state: Mapping[str, Tensor]) -> bool:
    """True when a (prefix-stripped) state_dict has the zoo's layout: its cell is ``full_stage.*``."""
    return any(name.startswith(ZOO_CELL) for name in state)


def _row_norm(w: Tensor) -> Tensor:
    return w.flatten(1).norm(dim=1).reshape(-1, *([1] * (w.dim() - 1)))


def _weight_norm_bases(names: Mapping[str, Tensor]) -> set[str]:
    """Module names that carry weight norm's pair (``weight_g`` + ``weight_v``, no spectral ``weight_orig``)."""
    return {n[:-len(".weight_g")] for n in names if n.endswith(".weight_g")
            and f"{n[:-len('.weight_g')]}.weight_v" in names and f"{n[:-len('.weight_g')]}.weight_orig" not in names}


def convert_zoo_state(state: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> tuple[dict[str, Tensor],
                                                                                           dict[str, int]]:
    """The zoo ``state`` renamed to deqlab's layout, with weight norm folded or split where ``target`` (the model's
    state_dict) normalises other convs. Returns the state and counts ``{"renamed", "folded", "split"}``."""
    out = {(OUR_CELL + name[len(ZOO_CELL):] if name.startswith(ZOO_CELL) else name): t for name, t in state.items()}
    counts = {"renamed": sum(name.startswith(ZOO_CELL) for name in state), "folded": 0, "split": 0}
    target_pairs = _weight_norm_bases(target)
    for base in sorted(_weight_norm_bases(out) - target_pairs):
        if f"{base}.weight" in target:  # the model's conv is plain: fold g / ||v|| into the weight
            g, v = out.pop(f"{base}.weight_g"), out.pop(f"{base}.weight_v")
            v64 = v.double()
            out[f"{base}.weight"] = (v64 * (g.double() / _row_norm(v64))).to(v.dtype)
            counts["folded"] += 1
    for base in sorted(target_pairs):
        w = out.get(f"{base}.weight")
        if w is not None and f"{base}.weight_g" not in out:  # the model's conv is weight-normalised: split
            del out[f"{base}.weight"]
            out[f"{base}.weight_g"], out[f"{base}.weight_v"] = _row_norm(w), w
            counts["split"] += 1
    return out, counts
