"""The fused path: the whole meta-step of a small Linear/ReLU MLP as one op (metafast.ops.fused_inner_loop).

The op runs the inner loop, the query loss and the exact second-order reverse per task in one kernel.
A configuration qualifies when the model is exactly such a chain, every parameter is adapted (not
ANIL: the op gives no gradient for the body's features), the loss is the built-in MSE or
cross-entropy, there is no inner gradient clipping, the precision is fp32 (float32 or float64
parameters), and a kernel of the op runs on the model's device: the CUDA extension or Triton on a
GPU, the C++ CPU kernel on CPU (or Triton's interpreter when METAFAST_BACKEND=triton asks for it).
With only the PyTorch version of the op, the exact reverse is as fast, so that path runs instead.

Where the extension runs the op, a batch signature is checked once (:meth:`FusedPath.prepare`) and
every later step with it goes straight to the op's C++ autograd node, re-checking only label values.
On a GPU the kernel first runs once per shape and process against the PyTorch reference on the same
device (:func:`self_check`, when the path is planned, not per step); a mismatch is a fallback
(metafast.fallback.FallbackWarning, an error under METAFAST_STRICT=1) to the next path.
"""
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ... import _backend
from ... import fallback as _fallback
from ...functional.losses import MSE, CrossEntropy
from ...ops import fused_inner_loop as op
from .base import FastWeights, MetaStepPath, StepOutput, Support, Where

SELF_CHECK_KEY = "fused_inner_loop.self_check"  # metafast.fallback key of a failed self-check


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
    """(dims, why): dims when the fused op runs this configuration, else None; why says which.
    ``verify`` (default: on GPUs) runs the kernel once against the PyTorch reference first; a failed
    check is reported through metafast.fallback."""
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
    ok, why = op.eligible(dims)
    if not ok:
        return None, why
    try:
        backend = _backend.resolve("fused_inner_loop", device)
    except (ValueError, RuntimeError) as e:  # METAFAST_BACKEND names a backend that cannot run it
        return None, str(e)
    if backend == "torch":  # a PyTorch version of the op is no faster than the exact reverse
        return None, "no fused kernel runs here (no metafast._C C++/CUDA kernel, no Triton on a GPU)"
    if verify if verify is not None else device.type == "cuda":
        ok, err = self_check(dims, _loss_name(loss_fn), dtype, device, backend)
        if not ok:
            why = (f"the fused kernel ({backend}) failed its self-check against the PyTorch reference on {device}: "
                   f"{err}")
            _fallback.fallback(SELF_CHECK_KEY, f"BatchedMAML: {why}; using the batched path (fused=False silences "
                               "this)", stacklevel=3)
            return None, why
    kernel = {"cuda": "metafast._C's CUDA kernel", "cpp": "metafast._C's C++ CPU kernel",
              "triton": "Triton kernel" + ("" if device.type == "cuda" else ", interpreted")}.get(backend, backend)
    return dims, f"fused inner loop ({kernel}) for MLP {'-'.join(map(str, dims))}"


def _loss_name(loss_fn) -> str:
    return "cross_entropy" if type(loss_fn) is CrossEntropy else "mse"


_self_checks: Dict[tuple, Tuple[bool, str]] = {}


def self_check(dims: List[int], loss: str, dtype: torch.dtype, device: torch.device,
               backend: str) -> Tuple[bool, str]:
    """Run the fused kernel once on a tiny second-order problem of this shape and compare its query
    losses and meta-gradient with the PyTorch reference on the same device; cached per process.
    (ok, what differed). A kernel that misbehaves on some GPU then costs speed, not correctness."""
    key = (tuple(dims), loss, dtype, str(device), backend)
    if key in _self_checks:
        return _self_checks[key]
    g = torch.Generator().manual_seed(0)
    T, Ns, Nq = 2, 3, 4
    P = op.num_params(dims)
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
                r = op.fused_inner_loop(th, [0.05, 0.05], sx, sy, qx, qy, dims, 2, loss, backend=b)
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


class FusedPath(MetaStepPath):
    """The meta-step of a Linear/ReLU MLP as one fused op; ``prepare`` checks a batch signature once."""

    name = "fused"
    title = "the fused inner loop"
    flag = "fused=True"

    def __init__(self, setup):
        super().__init__(setup)
        self._plans: Dict[tuple, Tuple[Optional[List[int]], str]] = {}

    def required(self) -> Optional[bool]:
        return True if self.setup.fused else None

    def plan(self, device: torch.device, dtype: torch.dtype) -> Tuple[Optional[List[int]], str]:
        """:func:`plan` for this configuration, once per device type and dtype (the self-check runs here)."""
        key = (device.type, dtype)
        hit = self._plans.get(key)
        if hit is None:
            s = self.setup
            hit = self._plans[key] = plan(s.module, s.loss_fn, s.anil, s.clip_grad_norm, dtype, device)
        return hit

    def supports(self, where: Where) -> Support:
        s = self.setup
        if s.fused is False:
            return Support(False, "fused=False")
        if s.prec.mixed:
            return Support(False, f"precision={s.prec.name!r} (the fused op is fp32/fp64)")
        if s.maml_pp_options():
            return Support(False, f"MAML++ option(s) {', '.join(s.maml_pp_options())} (the fused kernel "
                                  "implements none of them)")
        if where.steps == 0:
            return Support(False, "no inner steps to fuse", quiet=True)
        dims, why = self.plan(where.device, where.dtype)
        return Support(dims is not None, why)

    def _op_args(self, sx, sy, qx, qy, dims):
        """(lr, loss) of the fused op, after the batched path's target checks."""
        s = self.setup
        for x, y, name in ((sx, sy, "support_y"), (qx, qy, "query_y")):
            # the same target checks as the batched path, against the output shape alone (the op
            # itself checks label ranges on every device)
            s.loss_fn.check_target(torch.empty(*x.shape[:2], dims[-1], device="meta"), y, name)
        lr = s.lrs if s.lrs is not None else (s.inner_lrs if len(s.inner_lrs) > 1 else s.inner_lrs[0])
        return lr, _loss_name(s.loss_fn)

    def prepare(self, batch, steps):
        """(dims, lr, loss, checked): ``checked`` (the op's validated arguments) where the C++ autograd
        node runs the op, so that later steps skip every check but the label values."""
        sx, sy, qx, qy = batch
        buffer = self.setup.flat.buffer
        dims = self.plan(buffer.device, buffer.dtype)[0]
        lr, loss = self._op_args(sx, sy, qx, qy, dims)
        checked = op.check_args(buffer, lr, sx, sy, qx, qy, dims, steps, loss) if op.runs_eager_node(
            buffer.device) else None
        return dims, lr, loss, checked

    def run(self, batch, steps, prepared) -> StepOutput:
        s = self.setup
        sx, sy, qx, qy = batch
        dims, lr, loss, checked = prepared
        s.guard.overflow = None
        # the meta-parameters go in as the flat buffer and its parameter views: the op's autograd
        # node hands each parameter its gradient
        if checked is not None:
            checked.check_labels(sy, qy)  # label values: every call (the kernels index logits by them)
            mean, r = op.eager_meta_loss(s.flat.buffer, s.flat.params, checked, sx, sy, qx, qy, s.first_order,
                                         need_fast=False)
        else:
            mean, r = op.fused_meta_loss(s.flat.buffer, s.flat.params, lr, sx, sy, qx, qy, dims, steps, loss,
                                         first_order=s.first_order)
        s.guard.check(r.query_loss, "query loss", r.support_loss, mean)
        acc = CrossEntropy.accuracy(r.query_out.detach(), qy) if s.loss_fn.classification else None
        return StepOutput(r.query_loss, acc, r.support_loss, mean)

    def adapt(self, sx, sy, steps) -> FastWeights:
        s = self.setup
        theta = s.flat.theta().detach()
        s.guard.overflow = None
        dims = self.plan(theta.device, theta.dtype)[0]
        lr, loss = self._op_args(sx, sy, sx, sy, dims)
        with torch.no_grad():
            r = op.fused_meta_loss(theta, s.flat.params, lr, sx, sy, sx, sy, dims, steps, loss, first_order=True)[1]
        s.guard.check(r.support_loss, "support loss")
        return FastWeights(theta, r.fast, 0)
