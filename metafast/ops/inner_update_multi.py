"""The inner-loop update of one task whose parameters are a list of tensors:
``out[i] = params[i] - lr_i * scale * grads[i]``.

``inner_update_multi(params, grads, lr, max_norm=None)``
    lr a float or one tensor per parameter (shaped like it, or 0-d: Meta-SGD); scale =
    min(1, max_norm / (||grads|| + 1e-6)) with the global norm over all of grads (1 when max_norm is
    None), as ``torch.nn.utils.clip_grad_norm_``. The [T, P] form for a batch of tasks is
    metafast/ops/inner_update.py, whose clip constant, dtype rules and double-backward helper this
    op shares.

Differentiable w.r.t. params, grads and tensor lrs, twice (gradgradcheck holds).

Backends (``backend=`` keyword, else metafast._backend's choice)
- ``"cuda"``: the custom op ``metafast::inner_update_multi`` calling ``metafast::inner_update_multi_cuda``
  (every tensor in one launch); its backward is ``metafast::inner_update_multi_backward``, whose own
  derivative is formed from :func:`multi_backward_math` with PyTorch ops.
- ``"torch"``: torch._foreach without autograd (float32/float64), else :func:`inner_update_multi_reference`'s
  per-tensor ops under plain autograd.
"""
import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import _backend
from .inner_update import CLIP_EPS, FLOAT_DTYPES, HALF_DTYPES, check_max_norm, float_math, vjp_of

__all__ = ["inner_update_multi", "inner_update_multi_reference", "multi_backward_math"]


# --------------------------------------------------------------------------------------------
# Reference (the float64 test oracle, the CPU kernel and the benchmark baseline)
# --------------------------------------------------------------------------------------------
def inner_update_multi_reference(params: Sequence[Tensor], grads: Sequence[Tensor],
                                 lr: Union[float, Sequence[Tensor]], max_norm: Optional[float] = None) -> List[Tensor]:
    """out[i] = params[i] - lr_i * scale * grads[i] with one global clip norm, in plain PyTorch ops."""
    if len(params) == 0:
        return []
    dtype = params[0].dtype
    lrs = list(lr) if isinstance(lr, (list, tuple)) else [lr] * len(params)
    scale = None
    if max_norm is not None:
        norms = torch.stack([torch.linalg.vector_norm(float_math(g)) for g in grads])
        scale = (max_norm / (torch.linalg.vector_norm(norms) + CLIP_EPS)).clamp(max=1.0)
    outs = []
    for p, g, l in zip(params, grads, lrs):
        g = float_math(g)
        if scale is not None:
            g = g * scale
        o = float_math(p) - float_math(l) * g
        outs.append(o if o.dtype == dtype else o.to(dtype))
    return outs


def multi_backward_math(grad_outs: Sequence[Tensor], grads: Sequence[Tensor], lrs: Optional[Sequence[Tensor]],
                        lr_scalar: float, max_norm: Optional[float], need_grad: bool, need_lr: bool):
    """(d_grads, d_lrs) of sum_i sum(grad_outs[i] * out[i]) in PyTorch ops, None where not needed.
    The fused backward computes the same; this form is differentiable (double backward)."""
    dtype = grads[0].dtype
    gos = [float_math(x) for x in grad_outs]
    gs = [float_math(x) for x in grads]
    ls = [float_math(x) for x in lrs] if lrs else [lr_scalar] * len(gs)
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
def _check_args(params, grads, lr, max_norm) -> Tuple[Optional[List[Tensor]], float, Optional[float]]:
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
        if dtype not in FLOAT_DTYPES:
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
    return lrs, lr_s, check_max_norm(max_norm, where)


# --------------------------------------------------------------------------------------------
# Kernels per backend (metafast._backend.OPS lists them)
# --------------------------------------------------------------------------------------------
def _contig(xs: List[Tensor]) -> List[Tensor]:
    return [x.contiguous() for x in xs]


def _cuda_forward(params, grads, lrs, lr_scalar, max_norm):
    return list(torch.ops.metafast.inner_update_multi_cuda(_contig(params), _contig(grads), _contig(lrs),
                                                           lr_scalar, max_norm))


def _cuda_backward(grad_outs, grads, lrs, lr_scalar, max_norm, need_grad, need_lr):
    d_grads, d_lrs = torch.ops.metafast.inner_update_multi_backward_cuda(
        _contig(grad_outs), _contig(grads), _contig(lrs), lr_scalar, max_norm, need_grad, need_lr)
    return list(d_grads), list(d_lrs)


def _torch_forward(params, grads, lrs, lr_scalar, max_norm):
    return inner_update_multi_reference(params, grads, lrs if lrs else lr_scalar, max_norm)


def _torch_backward(grad_outs, grads, lrs, lr_scalar, max_norm, need_grad, need_lr):
    d_grads, d_lrs = multi_backward_math(grad_outs, grads, lrs, lr_scalar, max_norm, need_grad, need_lr)
    return d_grads or [], d_lrs or []


_backend.register("inner_update_multi", "cuda", forward=_cuda_forward, backward=_cuda_backward)
_backend.register("inner_update_multi", "torch", forward=_torch_forward, backward=_torch_backward,
                  reference=inner_update_multi_reference)


# --------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("metafast::inner_update_multi", mutates_args=())
def _multi_op(params: List[Tensor], grads: List[Tensor], lrs: List[Tensor], lr_scalar: float,
              max_norm: Optional[float], backend: str) -> List[Tensor]:
    return _backend.implementation("inner_update_multi", backend).forward(params, grads, lrs, lr_scalar, max_norm)


@_multi_op.register_fake
def _(params, grads, lrs, lr_scalar, max_norm, backend):
    return [p.new_empty(p.shape) for p in params]


@torch.library.custom_op("metafast::inner_update_multi_backward", mutates_args=())
def _multi_backward_op(grad_outs: List[Tensor], grads: List[Tensor], lrs: List[Tensor], lr_scalar: float,
                       max_norm: Optional[float], need_grad: bool, need_lr: bool,
                       backend: str) -> Tuple[List[Tensor], List[Tensor]]:
    return _backend.implementation("inner_update_multi", backend).backward(grad_outs, grads, lrs, lr_scalar,
                                                                           max_norm, need_grad, need_lr)


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
        d_grads, d_lrs = multi_backward_math(xs[:n], xs[n:2 * n], xs[2 * n:] or None, lr_scalar, max_norm,
                                             need_grad, need_lr)
        return (d_grads or [None] * n) + (d_lrs or [None] * n_lr)

    cot = (list(gg_grads) if need_grad and gg_grads is not None else [None] * n)
    cot += (list(gg_lrs) if need_lr and gg_lrs is not None else [None] * n_lr)
    res = vjp_of(fn, saved, wanted, cot)
    # list inputs take a list of gradients (None entries where not needed)
    return res[:n], res[n:2 * n], res[2 * n:], None, None, None, None, None


_multi_op.register_autograd(_multi_grad, setup_context=_multi_setup)
_multi_backward_op.register_autograd(_multi_backward_grad, setup_context=_multi_backward_setup)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
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
    norm of all grads. ``backend``: None (METAFAST_BACKEND / auto), "cuda" or "torch". On CUDA with
    the extension every tensor is updated in one kernel launch. Differentiable twice w.r.t. params,
    grads and tensor lrs.
    """
    lrs, lr_s, max_norm = _check_args(params, grads, lr, max_norm)
    if not params:
        return []
    chosen = _backend.resolve("inner_update_multi", params[0], backend)
    if chosen != "torch":
        return list(_multi_op(list(params), list(grads), lrs or [], lr_s, max_norm, chosen))
    # the torch backend: _foreach where no autograd is needed, else the reference under plain autograd
    if params[0].dtype not in HALF_DTYPES and not _needs_autograd(params, grads, lrs):
        return _multi_foreach(list(params), list(grads), lrs, lr_s, max_norm)
    return inner_update_multi_reference(params, grads, lrs if lrs is not None else lr_s, max_norm)
