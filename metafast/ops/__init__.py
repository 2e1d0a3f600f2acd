"""Fused ops: one file per op (torch.library registration, autograd, and the pure-PyTorch reference
that is also the CPU kernel)."""
from .inner_update import inner_update, inner_update_multi, inner_update_multi_reference, inner_update_reference

__all__ = ["inner_update", "inner_update_multi", "inner_update_multi_reference", "inner_update_reference"]
