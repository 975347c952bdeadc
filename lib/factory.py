"""``get_deq``: a DEQ layer from keyword arguments or from a config, in the spirit of torchdeq's ``get_deq(args)``."""
from __future__ import annotations

from typing import Any

from deqlab.config.deq_arguments import deq_arguments
from deqlab.deq import DEQ


def get_deq(cfg: Any = None, **kwargs: Any) -> DEQ:
    """A :class:`deqlab.DEQ` built from ``kwargs`` (its constructor's arguments) or, given a config ``cfg``, from
    its ``DEQ.*`` keys and the pretraining keys (``deqlab.config.deq_arguments.DEQ_KEYS``), ``kwargs`` overriding.
    """
    if cfg is not None:
        kwargs = {**deq_arguments(cfg), **kwargs}
    return DEQ(**kwargs)
