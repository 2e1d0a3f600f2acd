"""The inner-loop update of all T tasks at once: ``fast = theta - lr * clip(grad)``.

``inner_update(theta, grad, lr, max_norm=None)``
    fast[t, p] = theta[p or t, p] - lr[p or scalar] * scale[t] * grad[t, p]
    theta [P] (broadcast over tasks: the first inner step) or [T, P]; grad [T, P]; lr a Python float,
    a 0-d tensor or a [P] tensor (Meta-SGD); scale[t] = min(1, max_norm / (||grad[t]|| + 1e-6)), as
    ``torch.nn.utils.clip_grad_norm_`` applied to each task's row (1 when max_norm is None).

Differentiable w.r.t. theta, grad and a tensor lr, twice (second-order MAML differentiates through
it; gradgradcheck holds). The same update for one task whose parameters are separate tensors is
metafast/ops/inner_update_multi.py.

Dtypes: float16/bfloat16/float32/float64, one dtype for all inputs. The math runs in float32 for the
half types (float64 for float64) and is rounded once to the input dtype.

Backends (``backend=`` keyword, else metafast._backend's choice)
- ``"torch"``: :func:`inner_update_reference` under plain autograd. This is the CPU path: CPU
  tensors go straight to it, with nothing but the argument checks on top.
- ``"cuda"`` / ``"triton"``: the custom op ``metafast::inner_update`` calling the CUDA extension
  (``metafast::inner_update_cuda``) or the Triton kernels (kernels/inner_update.py). Its backward is
  the fused op ``metafast::inner_update_backward``, whose own derivative is formed from
  :func:`backward_math` with PyTorch ops. ``"triton"`` runs on CPU tensors under TRITON_INTERPRET=1.
"""
import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import _backend

__all__ = ["inner_update", "inner_update_reference", "backward_math", "float_math", "check_max_norm", "vjp_of",
           "CLIP_EPS", "FLOAT_DTYPES", "HALF_DTYPES"]

CLIP_EPS = 1e-6
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)

LrLike = Union[float, Tensor]


def float_math(x):
    """float32 for half tensors (the kernels' accumulation), unchanged otherwise."""
    return x.float() if isinstance(x, Tensor) and x.dtype in HALF_DTYPES else x


# --------------------------------------------------------------------------------------------
# Reference (the float64 test oracle, the CPU kernel and the benchmark baseline)
# --------------------------------------------------------------------------------------------
def inner_update_reference(theta: Tensor, grad: Tensor, lr: LrLike, max_norm: Optional[float] = None) -> Tensor:
    """fast = theta - lr * scale * grad in plain PyTorch ops (differentiable any number of times).
    Shapes as :func:`inner_update`; the norm for clipping is taken over the last dim."""
    dtype = grad.dtype
    theta, grad, lr = float_math(theta), float_math(grad), float_math(lr)
    if max_norm is not None:
        norm = torch.linalg.vector_norm(grad, dim=-1, keepdim=True)
        grad = grad * (max_norm / (norm + CLIP_EPS)).clamp(max=1.0)
    # one pass over [T, P] (theta - lr * grad would write lr * grad first)
    out = torch.addcmul(theta, lr, grad, value=-1.0) if isinstance(lr, Tensor) else torch.add(theta, grad, alpha=-lr)
    return out if out.dtype == dtype else out.to(dtype)


def backward_math(grad_out: Tensor, grad: Tensor, lr: Optional[Tensor], lr_scalar: float,
                   max_norm: Optional[float], need_grad: bool, need_theta: bool, need_lr: bool):
    """(d_grad, d_theta, d_lr) of sum(grad_out * fast) in PyTorch ops, None where not needed.
    The fused backward computes the same; this form is differentiable (double backward)."""
    dtype = grad.dtype
    go, g = float_math(grad_out), float_math(grad)
    lr_v = float_math(lr) if lr is not None else lr_scalar
    scale = kk = None
    if max_norm is not None and (need_grad or need_lr):
        n = torch.linalg.vector_norm(g, dim=1, keepdim=True)
        ne = n + CLIP_EPS
        c = max_norm / ne
        scale = c.clamp(max=1.0)
        if need_grad:
            # d scale / d grad = -max_norm / (n + eps)^2 * grad / n where clipped (clamp passes at c == 1)
            s = (go * lr_v * g).sum(dim=1, keepdim=True)
            active = (c <= 1.0) & (n > 0)
            n_safe = torch.where(n > 0, n, torch.ones_like(n))
            kk = torch.where(active, s * max_norm / (ne * ne * n_safe), torch.zeros_like(n))
    d_grad = d_theta = d_lr = None
    if need_grad:
        d_grad = -(lr_v * go) if scale is None else -(scale * (lr_v * go))
        if kk is not None:
            d_grad = d_grad + kk * g
        d_grad = d_grad.to(dtype)
    if need_theta:
        d_theta = go.sum(dim=0).to(dtype)
    if need_lr:
        prod = go * g if scale is None else scale * go * g
        d_lr = -(prod.sum() if lr.dim() == 0 else prod.sum(dim=0))
        d_lr = d_lr.to(dtype)
    return d_grad, d_theta, d_lr


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------
def check_max_norm(max_norm, where: str) -> Optional[float]:
    if max_norm is None:
        return None
    if isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real) or not max_norm > 0:
        raise ValueError(f"{where}: max_norm must be None or a float > 0, got {max_norm!r}")
    return float(max_norm)


def _check_args(theta, grad, lr, max_norm) -> Tuple[Optional[Tensor], float, Optional[float]]:
    """Validates the arguments of inner_update; returns (lr tensor or None, lr float, max_norm).
    Ordered so that valid input costs about a microsecond (this runs on the CPU hot path)."""
    if not isinstance(grad, Tensor):
        raise TypeError(f"inner_update: grad must be a Tensor [T, P], got {type(grad).__name__}")
    if not isinstance(theta, Tensor):
        raise TypeError(f"inner_update: theta must be a Tensor [P] or [T, P], got {type(theta).__name__}")
    g_shape, t_shape = grad.shape, theta.shape
    if len(g_shape) != 2:
        raise ValueError(f"inner_update: grad must be a 2-D tensor [T, P], got shape {tuple(g_shape)}")
    T, P = g_shape
    if t_shape != g_shape and (len(t_shape) != 1 or t_shape[0] != P):
        raise ValueError(f"inner_update: theta must have shape [P] = ({P},) or [T, P] = ({T}, {P}) to match grad, "
                         f"got {tuple(t_shape)}")
    dtype = grad.dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"inner_update: grad must be float16, bfloat16, float32 or float64, got {dtype}")
    if theta.dtype != dtype:
        raise TypeError(f"inner_update: theta must have grad's dtype {dtype}, got {theta.dtype}")
    if theta.device != grad.device:
        raise ValueError(f"inner_update: theta must be on grad's device {grad.device}, got {theta.device}")
    if type(lr) is float:
        lr_t, lr_s = None, lr
    elif isinstance(lr, Tensor):
        if lr.dim() != 0 and lr.shape != (P,):
            raise ValueError(f"inner_update: lr must be a float, a 0-d tensor or a tensor of shape [P] = ({P},), "
                             f"got shape {tuple(lr.shape)}")
        if lr.dtype != dtype:
            raise TypeError(f"inner_update: lr must have grad's dtype {dtype}, got {lr.dtype}")
        if lr.device != grad.device:
            raise ValueError(f"inner_update: lr must be on grad's device {grad.device}, got {lr.device}")
        lr_t, lr_s = lr, 0.0
    elif isinstance(lr, numbers.Real) and not isinstance(lr, bool):
        lr_t, lr_s = None, float(lr)
    else:
        raise TypeError(f"inner_update: lr must be a float, a 0-d tensor or a [P] tensor, got {type(lr).__name__}")
    return lr_t, lr_s, (None if max_norm is None else check_max_norm(max_norm, "inner_update"))


# --------------------------------------------------------------------------------------------
# Kernels per backend (metafast._backend.OPS lists them)
# --------------------------------------------------------------------------------------------
def _opt_contig(x: Optional[Tensor]) -> Optional[Tensor]:
    return x.contiguous() if x is not None else None


def _cuda_forward(theta, grad, lr, lr_scalar, max_norm):
    return torch.ops.metafast.inner_update_cuda(theta.contiguous(), grad.contiguous(), _opt_contig(lr), lr_scalar,
                                                max_norm)


def _cuda_backward(grad_out, grad, lr, lr_scalar, max_norm, need_grad, need_theta, need_lr):
    return tuple(torch.ops.metafast.inner_update_backward_cuda(grad_out.contiguous(), grad.contiguous(),
                                                               _opt_contig(lr), lr_scalar, max_norm, need_grad,
                                                               need_theta, need_lr))


def _torch_forward(theta, grad, lr, lr_scalar, max_norm):
    return inner_update_reference(theta, grad, lr if lr is not None else lr_scalar, max_norm)


def _torch_backward(grad_out, grad, lr, lr_scalar, max_norm, need_grad, need_theta, need_lr):
    outs = backward_math(grad_out, grad, lr, lr_scalar, max_norm, need_grad, need_theta, need_lr)
    return tuple(o if o is not None else grad.new_empty(0) for o in outs)


_TRITON = "metafast.kernels.inner_update"  # imported on first use: needs triton
_backend.register("inner_update", "cuda", forward=_cuda_forward, backward=_cuda_backward)
_backend.register("inner_update", "triton", forward=f"{_TRITON}:inner_update_fwd", backward=f"{_TRITON}:inner_update_bwd")
_backend.register("inner_update", "torch", forward=_torch_forward, backward=_torch_backward,
                  reference=inner_update_reference)


# --------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("metafast::inner_update", mutates_args=())
def _inner_update_op(theta: Tensor, grad: Tensor, lr: Optional[Tensor], lr_scalar: float,
                     max_norm: Optional[float], backend: str) -> Tensor:
    return _backend.implementation("inner_update", backend).forward(theta, grad, lr, lr_scalar, max_norm)


@_inner_update_op.register_fake
def _(theta, grad, lr, lr_scalar, max_norm, backend):
    return grad.new_empty(grad.shape)


@torch.library.custom_op("metafast::inner_update_backward", mutates_args=())
def _inner_update_backward_op(grad_out: Tensor, grad: Tensor, lr: Optional[Tensor], lr_scalar: float,
                              max_norm: Optional[float], need_grad: bool, need_theta: bool, need_lr: bool,
                              backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    return _backend.implementation("inner_update", backend).backward(grad_out, grad, lr, lr_scalar, max_norm,
                                                                     need_grad, need_theta, need_lr)


@_inner_update_backward_op.register_fake
def _(grad_out, grad, lr, lr_scalar, max_norm, need_grad, need_theta, need_lr, backend):
    T, P = grad.shape
    return (grad.new_empty((T, P) if need_grad else (0,)), grad.new_empty((P,) if need_theta else (0,)),
            grad.new_empty(lr.shape if need_lr else (0,)))


def _inner_update_setup(ctx, inputs, output):
    theta, grad, lr, lr_scalar, max_norm, backend = inputs
    ctx.save_for_backward(grad, lr)
    ctx.theta_broadcast = theta.dim() == 1
    ctx.cfg = (lr_scalar, max_norm, backend)


def _inner_update_grad(ctx, grad_out):
    grad, lr = ctx.saved_tensors
    lr_scalar, max_norm, backend = ctx.cfg
    need_theta, need_grad, need_lr = ctx.needs_input_grad[:3]
    need_lr = need_lr and lr is not None
    d_theta = d_grad = d_lr = None
    if need_theta and not ctx.theta_broadcast:
        d_theta = grad_out  # d fast / d theta is the identity
    need_theta_sum = need_theta and ctx.theta_broadcast
    if need_grad or need_lr or need_theta_sum:
        dg, dth, dl = _inner_update_backward_op(grad_out, grad, lr, lr_scalar, max_norm, need_grad,
                                                need_theta_sum, need_lr, backend)
        d_grad = dg if need_grad else None
        d_lr = dl if need_lr else None
        if need_theta_sum:
            d_theta = dth
    return d_theta, d_grad, d_lr, None, None, None


def _inner_update_backward_setup(ctx, inputs, output):
    grad_out, grad, lr, lr_scalar, max_norm, need_grad, need_theta, need_lr, backend = inputs
    ctx.save_for_backward(grad_out, grad, lr)
    ctx.cfg = (lr_scalar, max_norm, need_grad, need_theta, need_lr)


def vjp_of(fn, inputs: List[Optional[Tensor]], wanted: Sequence[bool], cotangents: Sequence[Optional[Tensor]]):
    """Vector-Jacobian product of ``fn(*inputs)`` (a tuple of tensors/None, or of lists of them) with
    ``cotangents`` w.r.t. the inputs flagged in ``wanted``: the derivative of a fused backward.
    Keeps the graph (for another backward) when grad mode is on, i.e. under create_graph=True."""
    create = torch.is_grad_enabled()
    with torch.enable_grad():
        xs = []
        for x, w in zip(inputs, wanted):
            if x is None:
                xs.append(None)
            elif w:
                xs.append(x if create else x.detach().requires_grad_())
            else:
                xs.append(x.detach())
        outs = fn(xs)
        pairs = [(o, c) for o, c in zip(outs, cotangents) if o is not None and c is not None and o.requires_grad]
        leaves = [i for i, (x, w) in enumerate(zip(xs, wanted)) if x is not None and w]
        result: List[Optional[Tensor]] = [None] * len(inputs)
        if not pairs or not leaves:
            return result
        grads = torch.autograd.grad([o for o, _ in pairs], [xs[i] for i in leaves], [c for _, c in pairs],
                                    create_graph=create, allow_unused=True)
    for i, g in zip(leaves, grads):
        result[i] = g
    return result


def _inner_update_backward_grad(ctx, gg_grad, gg_theta, gg_lr):
    grad_out, grad, lr = ctx.saved_tensors
    lr_scalar, max_norm, need_grad, need_theta, need_lr = ctx.cfg
    res = vjp_of(lambda xs: backward_math(xs[0], xs[1], xs[2], lr_scalar, max_norm, need_grad, need_theta, need_lr),
                  [grad_out, grad, lr], ctx.needs_input_grad[:3],
                  [gg_grad if need_grad else None, gg_theta if need_theta else None, gg_lr if need_lr else None])
    return res[0], res[1], res[2], None, None, None, None, None, None


_inner_update_op.register_autograd(_inner_update_grad, setup_context=_inner_update_setup)
_inner_update_backward_op.register_autograd(_inner_update_backward_grad, setup_context=_inner_update_backward_setup)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def inner_update(theta: Tensor, grad: Tensor, lr: LrLike, max_norm: Optional[float] = None, *,
                 backend: Optional[str] = None) -> Tensor:
    """fast [T, P] = theta - lr * scale * grad for all tasks at once (see the module docstring).

    theta [P] or [T, P]; grad [T, P]; lr a float, a 0-d tensor or a [P] tensor; max_norm None or > 0
    (per-task gradient-norm clipping). ``backend``: None (METAFAST_BACKEND / auto), "cuda", "triton"
    or "torch". Differentiable twice w.r.t. theta, grad and a tensor lr.
    """
    lr_t, lr_s, max_norm = _check_args(theta, grad, lr, max_norm)
    chosen = _backend.resolve("inner_update", grad, backend)
    if chosen == "torch":  # the reference under plain autograd (no custom op): the CPU path
        return inner_update_reference(theta, grad, lr, max_norm)
    return _inner_update_op(theta, grad, lr_t, lr_s, max_norm, chosen)
