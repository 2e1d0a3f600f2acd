"""Meta-learning algorithms."""
from .batched_maml import BatchedMAML, FastWeights, MetaOutput

__all__ = ["BatchedMAML", "FastWeights", "MetaOutput"]
