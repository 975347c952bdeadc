"""Training and evaluation engine shared by the tools: ``Trainer``, ``evaluate``, ``run_dir``."""
from deqlab.engine.evaluator import evaluate
from deqlab.engine.trainer import Trainer, run_dir, setup_logging

__all__ = ["Trainer", "evaluate", "run_dir", "setup_logging"]
