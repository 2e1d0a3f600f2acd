"""The inner-loop update of all T tasks at once: ``fast = theta - lr * clip(grad)``.

``inner_update(theta, grad, lr, max_norm=None)``
    fast[t, p] = theta[p or t, p] - lr[p or scalar] * scale[t] * grad[t, p]
    theta [P] (broadcast over tasks: the first inner step) or [T, P]; grad [T, P]; lr a Python float,
    a 0-d tensor or a [P] tensor (Meta-SGD); scale[t] = min(1, max_norm / (||grad[t]|| + 1e-6)), as
    ``torch.nn.utils.clip_grad_norm_`` applied to each task's row (1 when max_norm is None).
``inner_update_multi(params, grads, lr, max_norm=None)``
    The same for one task whose parameters are a list of tensors (lr a float or one tensor per
    parameter, shaped like it or 0-d); the clip norm is the global norm over all of grads.

Both are differentiable w.r.t. theta/params, grad(s) and tensor lrs, twice (second-order MAML
differentiates through them; gradgradcheck holds).

Dtypes: float16/bfloat16/float32/float64, one dtype for all inputs. The math runs in float32 for the
half types (float64 for float64) and is rounded once to the input dtype.

Backends (``backend=`` keyword, else ``metafast._backend.resolve``)
- ``"torch"``: :func:`inner_update_reference` under plain autograd. This is the CPU path: CPU
  tensors go straight to it, with nothing but the argument checks on top.
- ``"cuda"`` / ``"triton"``: the custom op ``metafast::inner_update`` calling the CUDA extension
  (``metafast::inner_update_cuda``) or the Triton kernels (kernels/inner_update.py). Its backward is
  the fused op ``metafast::inner_update_backward``, whose own derivative is formed from
  :func:`_backward_math` with PyTorch ops. ``"triton"`` runs on CPU tensors under TRITON_INTERPRET=1.
- ``inner_update_multi`` has ``"cuda"`` (``metafast::inner_update_multi``: every tensor in one launch)
  and ``"torch"`` (torch._foreach without autograd, else per-tensor reference ops).
"""
import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import _backend

__all__ = ["inner_update", "inner_update_reference", "inner_update_multi", "inner_update_multi_reference"]

CLIP_EPS = 1e-6
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)

_backend.register_op("inner_update", cuda_symbol="inner_update_cuda")
_backend.register_op("inner_update_multi", backends=("cuda", "torch"), cuda_symbol="inner_update_multi_cuda")

LrLike = Union[float, Tensor]


def _kernels():
    from metafast.kernels import inner_update as k  # imported on first use: needs triton

    return k


def _float_math(x):
    """float32 for half tensors (the kernels' accumulation), unchanged otherwise."""
    return x.float() if isinstance(x, Tensor) and x.dtype in _HALF_DTYPES else x


# --------------------------------------------------------------------------------------------
# References (the float64 test oracle, the CPU kernel and the benchmark baseline)
# --------------------------------------------------------------------------------------------
def inner_update_reference(theta: Tensor, grad: Tensor, lr: LrLike, max_norm: Optional[float] = None) -> Tensor:
    """fast = theta - lr * scale * grad in plain PyTorch ops (differentiable any number of times).
    Shapes as :func:`inner_update`; the norm for clipping is taken over the last dim."""
    dtype = grad.dtype
    theta, grad, lr = _float_math(theta), _float_math(grad), _float_math(lr)
    if max_norm is not None:
        norm = torch.linalg.vector_norm(grad, dim=-1, keepdim=True)
        grad = grad * (max_norm / (norm + CLIP_EPS)).clamp(max=1.0)
    # one pass over [T, P] (theta - lr * grad would write lr * grad first)
    out = torch.addcmul(theta, lr, grad, value=-1.0) if isinstance(lr, Tensor) else torch.add(theta, grad, alpha=-lr)
    return out if out.dtype == dtype else out.to(dtype)


def inner_update_multi_reference(params: Sequence[Tensor], grads: Sequence[Tensor],
                                 lr: Union[float, Sequence[Tensor]], max_norm: Optional[float] = None) -> List[Tensor]:
    """out[i] = params[i] - lr_i * scale * grads[i] with one global clip norm, in plain PyTorch ops."""
    if len(params) == 0:
        return []
    dtype = params[0].dtype
    lrs = list(lr) if isinstance(lr, (list, tuple)) else [lr] * len(params)
    scale = None
    if max_norm is not None:
        norms = torch.stack([torch.linalg.vector_norm(_float_math(g)) for g in grads])
        scale = (max_norm / (torch.linalg.vector_norm(norms) + CLIP_EPS)).clamp(max=1.0)
    outs = []
    for p, g, l in zip(params, grads, lrs):
        g = _float_math(g)
        if scale is not None:
            g = g * scale
        o = _float_math(p) - _float_math(l) * g
        outs.append(o if o.dtype == dtype else o.to(dtype))
    return outs


def _backward_math(grad_out: Tensor, grad: Tensor, lr: Optional[Tensor], lr_scalar: float,
                   max_norm: Optional[float], need_grad: bool, need_theta: bool, need_lr: bool):
    """(d_grad, d_theta, d_lr) of sum(grad_out * fast) in PyTorch ops, None where not needed.
    The fused backward computes the same; this form is differentiable (double backward)."""
    dtype = grad.dtype
    go, g = _float_math(grad_out), _float_math(grad)
    lr_v = _float_math(lr) if lr is not None else lr_scalar
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


def _multi_backward_math(grad_outs: Sequence[Tensor], grads: Sequence[Tensor], lrs: Optional[Sequence[Tensor]],
                         lr_scalar: float, max_norm: Optional[float], need_grad: bool, need_lr: bool):
    """(d_grads, d_lrs) of sum_i sum(grad_outs[i] * out[i]) in PyTorch ops, None where not needed."""
    dtype = grads[0].dtype
    gos = [_float_math(x) for x in grad_outs]
    gs = [_float_math(x) for x in grads]
    ls = [_float_math(x) for x in lrs] if lrs else [lr_scalar] * len(gs)
    scale = kk = None
    if max_norm is not None and (need_grad or need_lr):
        n = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gs]))
        ne = n + CLIP_EPS
        c = max_norm / ne
        scale = c.clamp(max=1.0)
        if need_grad:
            s = torch.stack([(go * l * g).sum() for go, l, g in zip(gos, ls, gs)]).sum()
            active = (c <= 1.0) & (n > 0)
            n_safe = torch.where(n > 0, n, torch.ones_like(n))
            kk = torch.where(active, s * max_norm / (ne * ne * n_safe), torch.zeros_like(n))
    d_grads = d_lrs = None
    if need_grad:
        d_grads = []
        for go, l, g in zip(gos, ls, gs):
            d = -(l * go) if scale is None else -(scale * (l * go))
            if kk is not None:
                d = d + kk * g
            d_grads.append(d.to(dtype))
    if need_lr:
        d_lrs = []
        for go, l, g in zip(gos, ls, gs):
            prod = go * g if scale is None else scale * go * g
            d = -(prod.sum() if l.dim() == 0 else prod)
            d_lrs.append(d.to(dtype))
    return d_grads, d_lrs


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------
def _check_max_norm(max_norm, where: str) -> Optional[float]:
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
    if dtype not in _FLOAT_DTYPES:
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
    return lr_t, lr_s, (None if max_norm is None else _check_max_norm(max_norm, "inner_update"))


def _check_multi_args(params, grads, lr, max_norm) -> Tuple[Optional[List[Tensor]], float, Optional[float]]:
    """Validates the arguments of inner_update_multi; returns (lr list or None, lr float, max_norm)."""
    where = "inner_update_multi"
    if not isinstance(params, (list, tuple)) or not all(isinstance(p, Tensor) for p in params):
        raise TypeError(f"{where}: params must be a list of Tensors")
    if not isinstance(grads, (list, tuple)) or not all(isinstance(g, Tensor) for g in grads):
        raise TypeError(f"{where}: grads must be a list of Tensors")
    if len(grads) != len(params):
        raise ValueError(f"{where}: grads must have one tensor per parameter ({len(params)}), got {len(grads)}")
    lrs = None
    if isinstance(lr, (list, tuple)):
        if len(lr) != len(params) or not all(isinstance(x, Tensor) for x in lr):
            raise ValueError(f"{where}: lr must be a float or a list of {len(params)} tensors (one per parameter)")
        lrs = list(lr)
        lr_s = 0.0
    elif isinstance(lr, numbers.Real) and not isinstance(lr, bool):
        lr_s = float(lr)
    else:
        raise TypeError(f"{where}: lr must be a float or a list of tensors, got {type(lr).__name__}")
    if params:
        dtype, device = params[0].dtype, params[0].device
        if dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{where}: params[0] must be float16, bfloat16, float32 or float64, got {dtype}")
        for i, p in enumerate(params):
            g = grads[i]
            for name, x in (("params", p), ("grads", g)) + ((("lr", lrs[i]),) if lrs else ()):
                if x.dtype != dtype:
                    raise TypeError(f"{where}: {name}[{i}] must have dtype {dtype} like params[0], got {x.dtype}")
                if x.device != device:
                    raise ValueError(f"{where}: {name}[{i}] must be on {device} like params[0], got {x.device}")
            if g.shape != p.shape:
                raise ValueError(f"{where}: grads[{i}] must have the shape of params[{i}] {tuple(p.shape)}, "
                                 f"got {tuple(g.shape)}")
            if lrs and lrs[i].dim() != 0 and lrs[i].shape != p.shape:
                raise ValueError(f"{where}: lr[{i}] must be 0-d or of the shape of params[{i}] {tuple(p.shape)}, "
                                 f"got {tuple(lrs[i].shape)}")
    return lrs, lr_s, _check_max_norm(max_norm, where)


# --------------------------------------------------------------------------------------------
# Custom ops: inner_update
# --------------------------------------------------------------------------------------------
def _opt_contig(x: Optional[Tensor]) -> Optional[Tensor]:
    return x.contiguous() if x is not None else None


@torch.library.custom_op("metafast::inner_update", mutates_args=())
def _inner_update_op(theta: Tensor, grad: Tensor, lr: Optional[Tensor], lr_scalar: float,
                     max_norm: Optional[float], backend: str) -> Tensor:
    if backend == "cuda":
        return torch.ops.metafast.inner_update_cuda(theta.contiguous(), grad.contiguous(), _opt_contig(lr),
                                                    lr_scalar, max_norm)
    if backend == "triton":
        return _kernels().inner_update_fwd(theta, grad, lr, lr_scalar, max_norm)
    return inner_update_reference(theta, grad, lr if lr is not None else lr_scalar, max_norm)


@_inner_update_op.register_fake
def _(theta, grad, lr, lr_scalar, max_norm, backend):
    return grad.new_empty(grad.shape)


@torch.library.custom_op("metafast::inner_update_backward", mutates_args=())
def _inner_update_backward_op(grad_out: Tensor, grad: Tensor, lr: Optional[Tensor], lr_scalar: float,
                              max_norm: Optional[float], need_grad: bool, need_theta: bool, need_lr: bool,
                              backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    if backend == "cuda":
        return tuple(torch.ops.metafast.inner_update_backward_cuda(
            grad_out.contiguous(), grad.contiguous(), _opt_contig(lr), lr_scalar, max_norm,
            need_grad, need_theta, need_lr))
    if backend == "triton":
        return _kernels().inner_update_bwd(grad_out, grad, lr, lr_scalar, max_norm, need_grad, need_theta, need_lr)
    outs = _backward_math(grad_out, grad, lr, lr_scalar, max_norm, need_grad, need_theta, need_lr)
    return tuple(o if o is not None else grad.new_empty(0) for o in outs)


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


def _vjp_of(fn, inputs: List[Optional[Tensor]], wanted: Sequence[bool], cotangents: Sequence[Optional[Tensor]]):
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
    res = _vjp_of(lambda xs: _backward_math(xs[0], xs[1], xs[2], lr_scalar, max_norm, need_grad, need_theta, need_lr),
                  [grad_out, grad, lr], ctx.needs_input_grad[:3],
                  [gg_grad if need_grad else None, gg_theta if need_theta else None, gg_lr if need_lr else None])
    return res[0], res[1], res[2], None, None, None, None, None, None


_inner_update_op.register_autograd(_inner_update_grad, setup_context=_inner_update_setup)
_inner_update_backward_op.register_autograd(_inner_update_backward_grad, setup_context=_inner_update_backward_setup)


# --------------------------------------------------------------------------------------------
# Custom ops: inner_update_multi
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("metafast::inner_update_multi", mutates_args=())
def _multi_op(params: List[Tensor], grads: List[Tensor], lrs: List[Tensor], lr_scalar: float,
              max_norm: Optional[float], backend: str) -> List[Tensor]:
    if backend == "cuda":
        return list(torch.ops.metafast.inner_update_multi_cuda(
            [p.contiguous() for p in params], [g.contiguous() for g in grads], [l.contiguous() for l in lrs],
            lr_scalar, max_norm))
    return inner_update_multi_reference(params, grads, lrs if lrs else lr_scalar, max_norm)


@_multi_op.register_fake
def _(params, grads, lrs, lr_scalar, max_norm, backend):
    return [p.new_empty(p.shape) for p in params]


@torch.library.custom_op("metafast::inner_update_multi_backward", mutates_args=())
def _multi_backward_op(grad_outs: List[Tensor], grads: List[Tensor], lrs: List[Tensor], lr_scalar: float,
                       max_norm: Optional[float], need_grad: bool, need_lr: bool,
                       backend: str) -> Tuple[List[Tensor], List[Tensor]]:
    if backend == "cuda":
        d_grads, d_lrs = torch.ops.metafast.inner_update_multi_backward_cuda(
            [x.contiguous() for x in grad_outs], [g.contiguous() for g in grads], [l.contiguous() for l in lrs],
            lr_scalar, max_norm, need_grad, need_lr)
        return list(d_grads), list(d_lrs)
    d_grads, d_lrs = _multi_backward_math(grad_outs, grads, lrs, lr_scalar, max_norm, need_grad, need_lr)
    return d_grads or [], d_lrs or []


@_multi_backward_op.register_fake
def _(grad_outs, grads, lrs, lr_scalar, max_norm, need_grad, need_lr, backend):
    return ([g.new_empty(g.shape) for g in grads] if need_grad else [],
            [l.new_empty(l.shape) for l in lrs] if need_lr else [])


def _multi_setup(ctx, inputs, output):
    params, grads, lrs, lr_scalar, max_norm, backend = inputs
    ctx.save_for_backward(*grads, *lrs)
    ctx.n, ctx.n_lr = len(grads), len(lrs)
    ctx.cfg = (lr_scalar, max_norm, backend)


def _zeros_for_none(grad_outs, like):
    return [go if go is not None else torch.zeros_like(x) for go, x in zip(grad_outs, like)]


def _multi_grad(ctx, grad_outs):
    saved = ctx.saved_tensors
    grads, lrs = list(saved[:ctx.n]), list(saved[ctx.n:])
    lr_scalar, max_norm, backend = ctx.cfg
    need_params, need_grad, need_lr = ctx.needs_input_grad[:3]
    need_lr = bool(need_lr) and bool(lrs)
    grad_outs = _zeros_for_none(grad_outs, grads)
    # list inputs take a list of gradients (None entries where not needed)
    d_params = list(grad_outs) if need_params else [None] * ctx.n
    d_grads, d_lrs = [None] * ctx.n, [None] * ctx.n_lr
    if need_grad or need_lr:
        dg, dl = _multi_backward_op(grad_outs, grads, lrs, lr_scalar, max_norm, bool(need_grad), need_lr, backend)
        d_grads = list(dg) if need_grad else d_grads
        d_lrs = list(dl) if need_lr else d_lrs
    return d_params, d_grads, d_lrs, None, None, None


def _multi_backward_setup(ctx, inputs, output):
    grad_outs, grads, lrs, lr_scalar, max_norm, need_grad, need_lr, backend = inputs
    ctx.save_for_backward(*grad_outs, *grads, *lrs)
    ctx.n, ctx.n_lr = len(grads), len(lrs)
    ctx.cfg = (lr_scalar, max_norm, need_grad, need_lr)


def _multi_backward_grad(ctx, gg_grads, gg_lrs):
    saved = list(ctx.saved_tensors)
    n, n_lr = ctx.n, ctx.n_lr
    lr_scalar, max_norm, need_grad, need_lr = ctx.cfg
    w_go, w_g, w_lr = (bool(x) for x in ctx.needs_input_grad[:3])
    wanted = [w_go] * n + [w_g] * n + [w_lr] * n_lr

    def fn(xs):
        d_grads, d_lrs = _multi_backward_math(xs[:n], xs[n:2 * n], xs[2 * n:] or None, lr_scalar, max_norm,
                                              need_grad, need_lr)
        return (d_grads or [None] * n) + (d_lrs or [None] * n_lr)

    cot = (list(gg_grads) if need_grad and gg_grads is not None else [None] * n)
    cot += (list(gg_lrs) if need_lr and gg_lrs is not None else [None] * n_lr)
    res = _vjp_of(fn, saved, wanted, cot)
    # list inputs take a list of gradients (None entries where not needed)
    return res[:n], res[n:2 * n], res[2 * n:], None, None, None, None, None


_multi_op.register_autograd(_multi_grad, setup_context=_multi_setup)
_multi_backward_op.register_autograd(_multi_backward_grad, setup_context=_multi_backward_setup)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def _choose(op: str, x: Tensor, backend: Optional[str]) -> str:
    # CPU tensors with no explicit request take the torch path without consulting _backend.
    if backend is None and x.is_cpu and not _backend.env_value():
        return "torch"
    return _backend.resolve(op, x.device, backend)


def inner_update(theta: Tensor, grad: Tensor, lr: LrLike, max_norm: Optional[float] = None, *,
                 backend: Optional[str] = None) -> Tensor:
    """fast [T, P] = theta - lr * scale * grad for all tasks at once (see the module docstring).

    theta [P] or [T, P]; grad [T, P]; lr a float, a 0-d tensor or a [P] tensor; max_norm None or > 0
    (per-task gradient-norm clipping). ``backend``: None (METAFAST_BACKEND / auto), "cuda", "triton"
    or "torch". Differentiable twice w.r.t. theta, grad and a tensor lr.
    """
    lr_t, lr_s, max_norm = _check_args(theta, grad, lr, max_norm)
    chosen = _choose("inner_update", grad, backend)
    if chosen == "torch":
        return inner_update_reference(theta, grad, lr, max_norm)
    return _inner_update_op(theta, grad, lr_t, lr_s, max_norm, chosen)


def _needs_autograd(*tensor_lists) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for ts in tensor_lists if ts for t in ts)


def _multi_foreach(params, grads, lrs, lr_s, max_norm) -> List[Tensor]:
    """The no-autograd torch path for float32/float64: a handful of torch._foreach launches."""
    if max_norm is not None:
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        grads = torch._foreach_mul(grads, (max_norm / (total + CLIP_EPS)).clamp(max=1.0))
    if lrs is None:
        return list(torch._foreach_add(params, grads, alpha=-lr_s))
    return list(torch._foreach_addcmul(params, lrs, grads, value=-1.0))


def inner_update_multi(params: Sequence[Tensor], grads: Sequence[Tensor], lr: Union[float, Sequence[Tensor]],
                       max_norm: Optional[float] = None, *, backend: Optional[str] = None) -> List[Tensor]:
    """[params[i] - lr_i * scale * grads[i]] for one task whose parameters are separate tensors.

    lr: a float, or one tensor per parameter (shaped like it, or 0-d); max_norm clips by the global
    norm of all grads. On CUDA with the extension every tensor is updated in one kernel launch.
    Differentiable twice w.r.t. params, grads and tensor lrs.
    """
    lrs, lr_s, max_norm = _check_multi_args(params, grads, lr, max_norm)
    if not params:
        return []
    chosen = _choose("inner_update_multi", params[0], backend)
    if chosen == "cuda":
        return list(_multi_op(list(params), list(grads), lrs or [], lr_s, max_norm, "cuda"))
    if params[0].dtype not in _HALF_DTYPES and not _needs_autograd(params, grads, lrs):
        return _multi_foreach(list(params), list(grads), lrs, lr_s, max_norm)
    return inner_update_multi_reference(params, grads, lrs if lrs is not None else lr_s, max_norm)
