"""Fused ops: one file per op (torch.library registration, autograd, and the pure-PyTorch reference
that is also the CPU kernel). Import the functions from their op modules, e.g.
``from metafast.ops.inner_update import inner_update``."""
