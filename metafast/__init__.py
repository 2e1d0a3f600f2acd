"""metafast: meta-learning for PyTorch on fused GPU kernels."""
__version__ = "0.1.0"
