"""metafast: meta-learning for PyTorch on fused GPU kernels."""
__version__ = "0.1.0"

from .algorithms import BatchedMAML, FastWeights, MetaOutput

__all__ = ["BatchedMAML", "FastWeights", "MetaOutput", "__version__"]
