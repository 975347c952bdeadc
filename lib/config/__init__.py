"""Strict config loading: the defaults in ``defaults.py``, then a YAML file, then ``KEY VALUE`` overrides.

Every key must exist in the defaults, every value must have the default's type and pass the key's rule
(``defaults.RULES``, see ``deqlab.config.rules``); anything else is a ``ConfigError`` naming the key, the
value, what is allowed and where it came from (with a close match when there is one). YAMLs written
for locuslab/mdeq (layout version 1) load too: ``LEGACY_RENAMES`` moves their keys, ``LEGACY_IGNORED`` lists
keys the original code read but this repository does not need (skipped with a warning).
"""
from __future__ import annotations

import difflib
import os
import warnings
from ast import literal_eval
from pathlib import Path
from typing import Any, Iterable

import yaml
from yacs.config import CfgNode

from deqlab.config.defaults import DEFAULTS, RULES
from deqlab.config.rules import check_values
from deqlab.errors import ConfigError
from deqlab.utils.files import atomic_open

LEGACY_RENAMES = {  # v1 (locuslab/mdeq) key -> this layout
    "MODEL.F_THRES": "DEQ.F_THRES",
    "MODEL.B_THRES": "DEQ.B_THRES",
}
LEGACY_IGNORED = {  # keys of the original YAMLs that carry no meaning here
    "DEBUG.DEBUG": "the original debug switch",
    "MODEL.INIT_WEIGHTS": "weights are always initialised as in the original",
}

__all__ = ["CfgNode", "get_defaults", "load_config", "dump_config", "config_name"]


def get_defaults() -> CfgNode:
    """A mutable copy of the defaults."""
    return DEFAULTS.clone()


def _flatten(tree: dict, prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _decode(text: str) -> Any:
    """A command-line or YAML string as a Python literal when it is one ("(0,1)", "1e-3", "True")."""
    try:
        return literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _coerce(value: Any, default: Any, key: str, source: str) -> Any:
    """``value`` converted to the type of ``default``, or a ConfigError saying what was expected."""
    if default == "auto":  # an "auto" key may also take True/False; its rule says which values it allows
        decoded = _decode(value) if isinstance(value, str) else value
        if isinstance(decoded, bool):
            return decoded
    if isinstance(value, str) and not isinstance(default, str):
        value = _decode(value)  # "(0,1)" -> (0, 1), "1e-3" -> 0.001, "True" -> True
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, (list, tuple)):
        if isinstance(value, (int, float)) and isinstance(default, tuple):  # "GPUS: 0" means (0,)
            value = (value,)
        ok = isinstance(value, (list, tuple))
        value = type(default)(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{source}: {key} expects {type(default).__name__} (default {default!r}), "
                          f"got {value!r}")
    return value


def _set(cfg: CfgNode, key: str, value: Any, source: str, sources: dict[str, str]) -> None:
    key = LEGACY_RENAMES.get(key, key)
    if key in LEGACY_IGNORED:
        warnings.warn(f"{source}: ignoring {key} ({LEGACY_IGNORED[key]})", stacklevel=3)
        return
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
        node = node.get(part) if isinstance(node, CfgNode) else None
    if not isinstance(node, CfgNode) or leaf not in node or isinstance(node[leaf], CfgNode):
        known = [k for k, _ in _flatten(yaml.safe_load(DEFAULTS.dump()))]
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"{source}: unknown config key {key}{hint}")
    node[leaf] = _coerce(value, node[leaf], key, source)
    sources[key] = source


def load_config(path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> CfgNode:
    """Defaults, merged with the YAML at ``path`` and the ``KEY VALUE`` list ``overrides``, checked; frozen."""
    cfg = get_defaults()
    sources: dict[str, str] = {}  # key -> the file or "command line" that set it last
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
        for key, value in _flatten(tree):
            _set(cfg, key, value, str(path), sources)
    overrides = list(overrides)
    if len(overrides) % 2:
        raise ConfigError(f"command line: overrides come as KEY VALUE pairs; {overrides[-1]!r} has no value")
    for key, value in zip(overrides[::2], overrides[1::2]):
        _set(cfg, key, value, "command line", sources)
    check_values(cfg, RULES, sources)
    cfg.freeze()
    return cfg


def config_name(path: str | os.PathLike) -> str:
    """The run name of a config file: its stem (``cls_mdeq_TINY``)."""
    return Path(path).stem


def dump_config(cfg: CfgNode, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (it can be passed back to ``--cfg``)."""
    with atomic_open(path, "w") as fh:
        fh.write(cfg.dump())
