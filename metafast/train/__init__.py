"""Training jobs behind the ``metafast`` command, with atomic checkpoints and exact resume."""
from .checkpoint import atomic_write, load_checkpoint, save_checkpoint
from .sinusoid import SinusoidConfig, TrainingInterrupted, train_sinusoid

__all__ = ["SinusoidConfig", "TrainingInterrupted", "train_sinusoid", "atomic_write", "save_checkpoint",
           "load_checkpoint"]
