"""Model registry: ``build_model(cfg)`` picks the class named by ``cfg.MODEL.NAME``."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from deqlab.errors import ConfigError
from deqlab.models.mdeq_cls import MDEQClassifier

MODELS: dict[str, Callable[[Any], nn.Module]] = {"mdeq": MDEQClassifier}


def register_model(name: str, builder: Callable[[Any], nn.Module]) -> None:
    """Make ``MODEL.NAME: name`` build ``builder(cfg)``."""
    MODELS[name] = builder


def build_model(cfg: Any) -> nn.Module:
    """Build the model named by ``cfg.MODEL.NAME`` from the config."""
    name = cfg.MODEL.NAME
    if name not in MODELS:
        raise ConfigError(f"MODEL.NAME: unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    return MODELS[name](cfg)
