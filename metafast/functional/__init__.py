"""Batched functional execution of a model over T tasks (leading task dim)."""
from .executor import BatchedModel
from .flat import FlatParams
from .losses import make_loss

__all__ = ["BatchedModel", "FlatParams", "make_loss"]
