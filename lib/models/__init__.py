"""Model registry: ``build_model(cfg, task)`` picks the ``task`` model named by ``cfg.MODEL.NAME``."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from deqlab.errors import ConfigError
from deqlab.models.mdeq_cls import MDEQClassifier
from deqlab.models.deq_transformer import DEQTransformerLM, build_deq_transformer  # noqa: F401 (public)
from deqlab.models.mdeq_seg import MDEQSegNet

# task -> MODEL.NAME -> builder. The original YAMLs call both the classifier and the segmenter "mdeq",
# so the task (chosen by the tool: cls_train.py, seg_train.py, ...) picks the table.
MODELS: dict[str, dict[str, Callable[[Any], nn.Module]]] = {
    "cls": {"mdeq": MDEQClassifier},
    "seg": {"mdeq": MDEQSegNet},
    "lm": {"deq_transformer": build_deq_transformer},  # builder(cfg, n_token=len(vocabulary))
}


def register_model(name: str, builder: Callable[[Any], nn.Module], task: str = "cls") -> None:
    """Make ``MODEL.NAME: name`` build ``builder(cfg)`` for ``task``."""
    MODELS.setdefault(task, {})[name] = builder


def build_model(cfg: Any, task: str = "cls", **kwargs: Any) -> nn.Module:
    """Build the ``task`` model named by ``cfg.MODEL.NAME`` from the config (``kwargs``: what the config cannot
    know, e.g. a language model's ``n_token``)."""
    if task not in MODELS:
        raise ValueError(f"unknown model task {task!r}; known: {', '.join(sorted(MODELS))}")
    name, known = cfg.MODEL.NAME, MODELS[task]
    if name not in known:
        raise ConfigError(f"MODEL.NAME: unknown {task} model {name!r}; known: {', '.join(sorted(known))}")
    return known[name](cfg, **kwargs)
