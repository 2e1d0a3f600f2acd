"""Multi-task training: ``MultiTask`` (shared trunk, batched heads), loss weighting strategies and a
trainer. ``metafast multitask`` runs the default job (metafast.jobs.multitask)."""
from .model import MultiTask
from .trainer import MultiTaskTrainer, per_task_accuracy
from .weighting import EqualWeighting, GradNorm, LossWeighting, UncertaintyWeighting, make_weighting

__all__ = ["MultiTask", "MultiTaskTrainer", "per_task_accuracy", "LossWeighting", "EqualWeighting",
           "UncertaintyWeighting", "GradNorm", "make_weighting"]
