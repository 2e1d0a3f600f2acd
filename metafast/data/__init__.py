"""Task families and few-shot data."""
from .sinusoid import SinusoidBatch, SinusoidTasks

__all__ = ["SinusoidBatch", "SinusoidTasks"]
