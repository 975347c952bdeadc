"""Checkpoints: atomic saves, weights-only loads, and loading the original MDEQ files.

Our checkpoints hold only state_dicts, tensors and primitives, so they load with
``torch.load(weights_only=True)``. The original MDEQ files are plain state_dicts too, possibly with a
``model.`` (segmentation wrapper) or ``module.`` (DataParallel) prefix and with aliases that carry no extra
information (``fullstage_copy.*``, ``deq.func.*``, ``deq.func_copy.*``) or belong to the loss
(``loss.*``); ``load_weights`` strips and drops those and says so. Old files that pickle Python objects load
only through the explicit :func:`load_legacy_pickle`.

Weight formats (``load_weights(fmt=...)``, ``MODEL.WEIGHTS_FORMAT``): ``deqlab`` is ours and locuslab/mdeq's
names; ``zoo`` is the torchdeq zoo's MDEQ, converted by :mod:`deqlab.compat.zoo_checkpoints`; ``auto`` picks
from the keys. A format that the keys contradict is an error rather than a guess.
"""
from __future__ import annotations

import logging
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from deqlab.compat.zoo_checkpoints import convert_zoo_state, is_zoo_state
from deqlab.errors import CheckpointError
from deqlab.utils.files import atomic_open

log = logging.getLogger(__name__)

STRIPPED_PREFIXES = ("module.", "model.")  # DataParallel/DDP, and the original segmentation wrapper
DROPPED_PREFIXES = ("fullstage_copy.", "deq.func.", "deq.func_copy.", "loss.")
PathLike = str | os.PathLike
WEIGHT_FORMATS = ("auto", "deqlab", "zoo")


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
        with warnings.catch_warnings():  # torch warns on a plain pickle's protocol before failing: we say what it is
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # the unpickler fails in many ways on a damaged file
        content = _plain_pickle_content(path)
        if content is not None:
            raise CheckpointError(f"checkpoint {path} is a plain pickle holding {content}, not a checkpoint or "
                                  f"state_dict saved with torch.save") from None
        if (isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err)
                and "Unsupported global" in str(err)):
            raise CheckpointError(
                f"checkpoint {path} holds Python objects that weights-only loading refuses; if you trust the "
                f"file, load it with deqlab.checkpoint.load_legacy_pickle") from None
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise CheckpointError(f"checkpoint {path} is not a readable checkpoint (corrupt or truncated?): {reason}") from None


class _StandIn:
    """What :class:`_InertUnpickler` makes of every global: accepts any construction and state, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # a reconstructor called with the class to rebuild (copyreg._reconstructor, numpy's _reconstruct):
        # the object is of that class
        if args and isinstance(args[0], type) and issubclass(args[0], _StandIn):
            self._kind = args[0]

    def __setstate__(self, state: Any) -> None:
        pass


class _InertUnpickler(pickle.Unpickler):
    """Reads a pickle's structure without importing or calling anything (every global is a ``_StandIn``), to say
    what a file holds; torch's persistent ids (tensor storages) are refused."""

    def find_class(self, module: str, name: str) -> type:
        return type(name, (_StandIn,), {"__module__": module, "__qualname__": name})

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("a torch file (persistent ids), not a plain pickle")


def _plain_pickle_content(path: Path) -> str | None:
    """What a valid plain (not torch.save) pickle at ``path`` holds, e.g. ``a list``; None for anything else."""
    try:
        with path.open("rb") as fh:
            obj = _InertUnpickler(fh).load()
    except Exception:  # not a pickle, or a torch file: the caller reports it as unreadable
        return None
    if isinstance(obj, int) and obj == torch.serialization.MAGIC_NUMBER:  # torch's pre-1.6 (non-zip) format
        return None
    return describe(obj)


def describe(obj: Any) -> str:
    """A few words on what ``obj`` is, for errors about files that are not checkpoints: ``a dict with keys ...``."""
    kind = obj._kind if isinstance(obj, _StandIn) and hasattr(obj, "_kind") else type(obj)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    text = f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"
    if isinstance(obj, Mapping):
        return f"{text} (keys: {_summary(map(str, obj))})" if obj else f"an empty {name}"
    return text


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
    raise CheckpointError(f"checkpoint {path} holds {describe(obj)}, not a checkpoint or state_dict (expected a dict "
                          f"of tensors, or a dict with one under 'model' or 'state_dict')")


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


def to_model_layout(state: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor], fmt: str,
                    path: PathLike) -> dict[str, torch.Tensor]:
    """``state`` (prefix-stripped) in the model's layout: a ``zoo`` file is converted; ``fmt`` (one of
    ``WEIGHT_FORMATS``) must agree with what the keys say when it is not ``auto``."""
    if fmt not in WEIGHT_FORMATS:
        raise CheckpointError(f"unknown weights format {fmt!r} (MODEL.WEIGHTS_FORMAT); known: "
                              f"{', '.join(WEIGHT_FORMATS)}")
    found = "zoo" if is_zoo_state(state) else "deqlab"
    if fmt != "auto" and fmt != found:
        raise CheckpointError(
            f"checkpoint {path} is not in the {fmt!r} format (MODEL.WEIGHTS_FORMAT): its keys are "
            f"{'the torchdeq zoo' if found == 'zoo' else 'deqlab/locuslab-mdeq'}'s "
            f"({'full_stage.*' if found == 'zoo' else 'no full_stage.*'}); use {found!r} or auto")
    if found == "deqlab":
        return state
    state, counts = convert_zoo_state(state, own)
    log.info("%s: torchdeq zoo checkpoint converted (deqlab.compat.zoo_checkpoints): %d cell tensors renamed, "
             "weight norm folded into %d convs and split out of %d", path, counts["renamed"], counts["folded"],
             counts["split"])
    return state


def _summary(names: Iterable[str], limit: int = 8) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return f"{shown} (+{len(names) - limit} more)" if len(names) > limit else shown


def load_weights(model: nn.Module, path: PathLike, strict: bool = True,
                 exclude: tuple[str, ...] = (), fmt: str = "auto") -> dict[str, list[str]]:
    """Load model weights from ``path`` (ours, an original MDEQ file, or one in the weights format ``fmt``, see
    the module docstring) into ``model``.

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
    state = to_model_layout(state, own, fmt, path)
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
