"""Training and evaluation engine shared by every task: ``Trainer``, ``evaluate``, run files, tool mains."""
from deqlab.engine.evaluator import evaluate
from deqlab.engine.logs import setup_logging
from deqlab.engine.run_files import RunFiles, run_dir, run_files
from deqlab.engine.trainer import Trainer

__all__ = ["Trainer", "evaluate", "run_dir", "run_files", "RunFiles", "setup_logging"]
