"""Fused ops: one file per op (torch.library registration, autograd, and the pure-PyTorch reference
that is also the CPU kernel), each registering its kernels per backend with metafast._backend. Import
the functions from their op modules, e.g. ``from metafast.ops.inner_update import inner_update``.
theta_view.py is not an op: it holds ThetaView, which the ops and metafast.functional share."""
