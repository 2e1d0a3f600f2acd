"""When BatchedMAML hands the whole meta-step to the fused inner-loop op, and why (not).

The fused op (metafast/ops/fused_inner_loop.py) runs the inner loop, the query loss and the exact
second-order reverse of a small Linear/ReLU MLP per task in one kernel. A model qualifies when it is
exactly such a chain, every parameter is adapted (not ANIL: the op gives no gradient for the body's
features), the loss is the built-in MSE or cross-entropy, there is no inner gradient clipping, and a
kernel of the op runs on the model's device: the CUDA extension or Triton on a GPU, the C++ CPU
kernel on CPU (or Triton's interpreter when METAFAST_BACKEND=triton asks for it). With only the
PyTorch version of the op, the batched path with its exact reverse is as fast, so it stays.
"""
from typing import List, Optional, Tuple

import torch
from torch import nn

from .. import _backend
from ..functional.losses import MSE, CrossEntropy


def mlp_dims(model: nn.Module) -> Optional[List[int]]:
    """[d0, ..., dL] for an nn.Sequential of Linear layers with ReLU between them, else None."""
    if not isinstance(model, nn.Sequential) or len(model) == 0:
        return None
    mods = list(model)
    linears, dims = mods[0::2], []
    if len(mods) % 2 == 0 or any(type(m) is not nn.ReLU for m in mods[1::2]):
        return None
    for i, m in enumerate(linears):
        if type(m) is not nn.Linear or m.bias is None:
            return None
        if i and m.in_features != dims[-1]:
            return None
        if not i:
            dims.append(m.in_features)
        dims.append(m.out_features)
    return dims


def plan(model: nn.Module, loss_fn, anil: bool, clip_grad_norm, dtype: torch.dtype,
         device: torch.device) -> Tuple[Optional[List[int]], str]:
    """(dims, why): dims when the fused path runs this configuration, else None; why says which."""
    dims = mlp_dims(model)
    if dims is None:
        return None, "the model is not a chain of Linear layers with ReLU between them"
    if anil:
        return None, "anil=True (the fused op adapts every layer and gives no gradient for body features)"
    if clip_grad_norm is not None:
        return None, "clip_grad_norm is set"
    if type(loss_fn) not in (MSE, CrossEntropy):
        return None, "the loss is a custom function"
    if dtype not in (torch.float32, torch.float64):
        return None, f"the parameters are {dtype} (the fused op takes float32 or float64)"
    try:
        from ..ops import fused_inner_loop as op
    except ImportError as e:
        return None, f"the fused op is not importable ({e})"
    ok, why = op.eligible(dims)
    if not ok:
        return None, why
    try:
        backend = _backend.resolve("fused_inner_loop", device)
    except (ValueError, RuntimeError) as e:  # METAFAST_BACKEND names a backend that cannot run it
        return None, str(e)
    if backend == "torch":  # a PyTorch version of the op is no faster than the batched path
        return None, "no fused kernel runs here (no metafast._C C++/CUDA kernel, no Triton on a GPU)"
    kernel = {"cuda": "metafast._C's " + ("CUDA" if device.type == "cuda" else "C++ CPU") + " kernel",
              "triton": "Triton kernel" + ("" if device.type == "cuda" else ", interpreted")}.get(backend, backend)
    return dims, f"fused inner loop ({kernel}) for MLP {'-'.join(map(str, dims))}"
