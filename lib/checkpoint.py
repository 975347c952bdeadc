"""Checkpoints: atomic saves, weights-only loads, and loading the original MDEQ files.

Our checkpoints hold only state_dicts, tensors and primitives, so they load with
``torch.load(weights_only=True)``. The original MDEQ files are plain state_dicts too, possibly with a
``model.`` (segmentation wrapper) or ``module.`` (DataParallel) prefix and with aliases that carry no extra
information (``fullstage_copy.*``, ``deq.func.*``, ``deq.func_copy.*``) or belong to the loss
(``loss.*``); ``load_weights`` strips and drops those and says so. Old files that pickle Python objects load
only through the explicit :func:`load_legacy_pickle`.
"""
from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from deqlab.errors import CheckpointError
from deqlab.utils.files import atomic_open

log = logging.getLogger(__name__)

STRIPPED_PREFIXES = ("module.", "model.")  # DataParallel/DDP, and the original segmentation wrapper
DROPPED_PREFIXES = ("fullstage_copy.", "deq.func.", "deq.func_copy.", "loss.")
PathLike = str | os.PathLike


def save_checkpoint(path: PathLike, state: Mapping[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, fsync, rename."""
    with atomic_open(path, "wb") as fh:
        torch.save(dict(state), fh)


def load_checkpoint(path: PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors for missing, corrupt or unsafe files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # the unpickler fails in many ways on a damaged file
        if (isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err)
                and "Unsupported global" in str(err)):
            raise CheckpointError(
                f"checkpoint {path} holds Python objects that weights-only loading refuses; if you trust the "
                f"file, load it with deqlab.checkpoint.load_legacy_pickle") from None
        raise CheckpointError(f"checkpoint {path} is not a readable checkpoint (corrupt or truncated?): "
                              f"{' '.join(str(err).split())[:200]}") from None


def load_legacy_pickle(path: PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load an old checkpoint that pickles Python objects. This runs arbitrary code: trusted files only."""
    log.warning("loading %s with weights_only=False (legacy pickle): only do this for files you trust", path)
    return torch.load(Path(path), map_location=map_location, weights_only=False)


def state_dict_of(obj: Any, path: PathLike = "<checkpoint>") -> dict[str, torch.Tensor]:
    """The model state_dict inside a loaded checkpoint: ours (``{"model": ...}``) or a plain state_dict."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise CheckpointError(f"checkpoint {path} holds no model weights (expected a state_dict or a dict with 'model')")


def nonfinite_tensors(obj: Any, prefix: str = "") -> tuple[list[str], int]:
    """The names of the floating-point tensors in ``obj`` (nested dicts, lists and tuples, e.g. a state_dict or
    a whole resume checkpoint) holding a NaN or an infinity, and how many floating-point tensors it holds."""
    if isinstance(obj, torch.Tensor):
        if not obj.is_floating_point():
            return [], 0
        return ([] if bool(torch.isfinite(obj).all()) else [prefix or "<tensor>"]), 1
    items = obj.items() if isinstance(obj, Mapping) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    bad: list[str] = []
    total = 0
    for key, value in items:
        names, count = nonfinite_tensors(value, f"{prefix}.{key}" if prefix else str(key))
        bad.extend(names)
        total += count
    return bad, total


def describe_nonfinite(names: list[str], total: int) -> str:
    """``"34 of 35 tensors non-finite (a, b, ...)"``: how a message names a diverged model's tensors."""
    return f"{len(names)} of {total} tensors non-finite ({_summary(names, 3)})"


def clean_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Strip wrapper prefixes and drop alias/loss entries; return the clean dict and the dropped names."""
    clean, dropped = {}, []
    for name, tensor in state.items():
        for prefix in STRIPPED_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        if name.startswith(DROPPED_PREFIXES):
            dropped.append(name)
        else:
            clean[name] = tensor
    return clean, dropped


def _summary(names: Iterable[str], limit: int = 8) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return f"{shown} (+{len(names) - limit} more)" if len(names) > limit else shown


def load_weights(model: nn.Module, path: PathLike, strict: bool = True,
                 exclude: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Load model weights from ``path`` (ours or an original MDEQ file) into ``model``.

    ``strict``: every tensor must be present with the right shape, else a CheckpointError lists the
    offenders. ``strict=False`` is partial transfer (``MODEL.PRETRAINED``): tensors whose name and shape match
    are loaded, the rest reported. Names starting with an ``exclude`` prefix are never loaded.
    Returns ``{"dropped", "missing", "unexpected", "mismatched"}``.
    """
    model = getattr(model, "module", model)  # unwrap DDP
    state, dropped = clean_state_dict(state_dict_of(load_checkpoint(path), path))
    bad, total = nonfinite_tensors(state)
    if bad:  # the weights of a diverged run: nothing to train from or evaluate
        raise CheckpointError(f"checkpoint {path} holds a diverged model: {describe_nonfinite(bad, total)}")
    if dropped:
        log.info("%s: dropped %d alias/loss entries (%s)", path, len(dropped),
                 ", ".join(sorted({n.split(".")[0] + "." for n in dropped})))
    own = model.state_dict()
    excluded = [k for k in state if k.startswith(exclude)]  # str.startswith(()) is False
    state = {k: v for k, v in state.items() if not k.startswith(exclude)}
    missing = [k for k in own if k not in state and not k.startswith(exclude)]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in state if k in own and state[k].shape != own[k].shape]
    if strict and (missing or unexpected or mismatched):
        parts = [f"{label}: {_summary(items)}" for label, items in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)) if items]
        raise CheckpointError(f"checkpoint {path} does not fit this model (another config?); " + "; ".join(parts))
    loadable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(loadable, strict=False)
    if not strict:
        log.info("%s: loaded %d of %d model tensors (%d missing, %d unexpected, %d wrong shape, %d excluded)",
                 path, len(loadable), len(own), len(missing), len(unexpected), len(mismatched), len(excluded))
    return {"dropped": dropped + excluded, "missing": missing, "unexpected": unexpected,
            "mismatched": mismatched}
