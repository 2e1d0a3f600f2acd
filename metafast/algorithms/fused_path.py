"""When BatchedMAML hands the whole meta-step to the fused inner-loop op, and why (not).

The fused op (metafast/ops/fused_inner_loop.py) runs the inner loop, the query loss and the exact
second-order reverse of a small Linear/ReLU MLP per task in one kernel. A model qualifies when it is
exactly such a chain, every parameter is adapted (not ANIL: the op gives no gradient for the body's
features), the loss is the built-in MSE or cross-entropy, there is no inner gradient clipping, and a
kernel of the op runs on the model's device: the CUDA extension or Triton on a GPU, the C++ CPU
kernel on CPU (or Triton's interpreter when METAFAST_BACKEND=triton asks for it). With only the
PyTorch version of the op, the batched path with its exact reverse is as fast, so it stays.
On a GPU the kernel first runs once per shape and process against the PyTorch reference on the same
device (``self_check``); a mismatch falls back to the batched path with a warning.
"""
import warnings
from typing import Dict, List, Optional, Tuple

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
         device: torch.device, verify: Optional[bool] = None) -> Tuple[Optional[List[int]], str]:
    """(dims, why): dims when the fused path runs this configuration, else None; why says which.
    ``verify`` (default: on GPUs) runs the kernel once against the PyTorch reference first."""
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
    loss = "cross_entropy" if type(loss_fn) is CrossEntropy else "mse"
    if verify if verify is not None else device.type == "cuda":
        ok, err = self_check(dims, loss, dtype, device, backend)
        if not ok:
            why = (f"the fused kernel ({backend}) failed its self-check against the PyTorch reference on {device}: "
                   f"{err}")
            warnings.warn(f"BatchedMAML: {why}; using the batched path (fused=False silences this)", RuntimeWarning)
            return None, why
    kernel = {"cuda": "metafast._C's CUDA kernel", "cpp": "metafast._C's C++ CPU kernel",
              "triton": "Triton kernel" + ("" if device.type == "cuda" else ", interpreted")}.get(backend, backend)
    return dims, f"fused inner loop ({kernel}) for MLP {'-'.join(map(str, dims))}"


_self_checks: Dict[tuple, Tuple[bool, str]] = {}


def self_check(dims: List[int], loss: str, dtype: torch.dtype, device: torch.device,
               backend: str) -> Tuple[bool, str]:
    """Run the fused kernel once on a tiny second-order problem of this shape and compare its query
    losses and meta-gradient with the PyTorch reference on the same device; cached per process.
    (ok, what differed). A kernel that misbehaves on some GPU then costs speed, not correctness."""
    key = (tuple(dims), loss, dtype, str(device), backend)
    if key in _self_checks:
        return _self_checks[key]
    from ..ops.fused_inner_loop import fused_inner_loop, num_params

    g = torch.Generator().manual_seed(0)
    T, Ns, Nq = 2, 3, 4
    P = num_params(dims)
    theta = (torch.randn(P, generator=g, dtype=torch.float64) * 0.3).to(device, dtype)
    sx, qx = (torch.randn(T, n, dims[0], generator=g, dtype=torch.float64).to(device, dtype) for n in (Ns, Nq))
    if loss == "mse":
        sy, qy = (torch.randn(T, n, dims[-1], generator=g, dtype=torch.float64).to(device, dtype) for n in (Ns, Nq))
    else:
        sy, qy = (torch.randint(0, dims[-1], (T, n), generator=g).to(device) for n in (Ns, Nq))
    tol = 1e-9 if dtype == torch.float64 else 1e-3
    try:
        got, want = [], []
        for b, out in ((backend, got), ("torch", want)):
            th = theta.clone().requires_grad_(True)
            with torch.enable_grad():
                r = fused_inner_loop(th, [0.05, 0.05], sx, sy, qx, qy, dims, 2, loss, backend=b)
                (grad,) = torch.autograd.grad(r.query_loss.sum(), th)
            out += [r.query_loss.detach(), r.fast, grad]
        errs = [((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(got, want)]
        bad = [f"{n} rel. err {e:.1e}" for n, e in zip(("query loss", "adapted weights", "meta-gradient"), errs)
               if not e <= tol]
        result = (not bad, ", ".join(bad) or "ok")
    except Exception as e:  # noqa: BLE001 - a kernel that cannot run here is a failed check, not a crash
        result = (False, f"{type(e).__name__}: {e}")
    _self_checks[key] = result
    return result
