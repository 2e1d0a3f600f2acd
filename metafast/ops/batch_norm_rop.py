"""Batch norm's R-operators with batch statistics: what MAML's exact second-order reverse
(metafast/functional/meta_step.py) needs of a BatchNorm layer.

With xhat = (x - mean) invstd and y = w xhat + b, and
    bnb(v) := native_batch_norm_backward(v) = w invstd (v - mean(v) - xhat mean(v xhat))
(with sum(v xhat), sum(v) as its weight / bias grads), which is linear in v:

``rforward(x, w, mean, invstd, rx, rw, rb) -> (R(y), sum(rx xhat), sum(rx))``
    R(y) = bnb(rx) + R(w) xhat + R(b); since R(xhat) = invstd (rx - mean(rx) - xhat mean(xhat rx)),
    w R(xhat) = bnb(rx). rx or (rw, rb) may be None; the sums are None without rx.

``rbackward(x, w, mean, invstd, gy, rgy, rx, sum_rx_xhat, sum_rx, rw, need_gx) -> (R(dx), R(dw), R(db))``
    the R-operator of batch norm's backward at gy along (rx, R(w)), applied to rgy:
    R(dx) = bnb(rgy) + R(w invstd) (gy - m1 - xhat m2) - w invstd (xhat sum(gy R(xhat)) / M + m2 R(xhat)),
    R(dw) = sum(rgy xhat) + sum(gy R(xhat)),  R(db) = sum(rgy),
    with m1 = mean(gy), m2 = mean(gy xhat), R(invstd) = -invstd^2 mean(xhat rx), M = N * prod(spatial).

x and the maps are [N, C, *spatial]; w, mean, invstd, rw, rb, the sums [C] (w None: no affine weight).

Backends: "cpp" -- the extension's C++ kernels ``metafast::batch_norm_rforward_cxx`` /
``batch_norm_rbackward_cxx``, CPU tensors only (contiguous float32 / float64, no autograd): one task per
channel makes both of its passes while the channel is in cache, so each full-size map crosses memory
once; "torch" -- :func:`rforward_reference` / :func:`rbackward_reference`, a few fused
native_batch_norm_backward calls and in-place updates, any device and float dtype, differentiable; inputs
the C++ kernels do not serve run it whichever backend is chosen. :func:`per_channel` and :func:`affine`
are shared with the batched BatchNorm layer (metafast/functional/layers.py).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _backend
from .batch_norm import cpu_maps_ok

__all__ = ["rforward", "rbackward", "rforward_reference", "rbackward_reference", "per_channel", "affine"]
_bnb = torch.ops.aten.native_batch_norm_backward


def per_channel(v: Tensor, like: Tensor) -> Tensor:
    """A [C] vector viewed to broadcast over the channel dim (dim 1) of ``like``, in its dtype."""
    return v.to(like.dtype).view((1, -1) + (1,) * (like.dim() - 2))


def affine(y: Optional[Tensor], x: Tensor, a: Tensor, c: Tensor) -> Tensor:
    """y + a x + c with per-channel a, c (y may be None); y is updated in place."""
    if y is None:
        return torch.addcmul(per_channel(c, x), x, per_channel(a, x))
    return y.addcmul_(x, per_channel(a, x)).add_(per_channel(c, x))


def _ones_if_none(w: Optional[Tensor], x: Tensor) -> Tensor:
    """The affine weight (ones without one: bnb's sums need one)."""
    return w if w is not None else torch.ones(x.shape[1], dtype=x.dtype, device=x.device)


def rforward_reference(x, w, mean, invstd, rx, rw, rb):
    ry, sx_rx, s_rx = None, None, None
    if rx is not None:
        ry, sx_rx, s_rx = _bnb(rx, x, _ones_if_none(w, x), None, None, mean, invstd, True, 0.0, [True, True, True])
    if rw is not None:  # + R(w) xhat + R(b) = a x + (R(b) - a mean)
        rw, rb = rw.to(invstd.dtype), rb.to(invstd.dtype)
        a = rw * invstd
        ry = affine(ry, x, a, rb - a * mean)
    return ry, sx_rx, s_rx


def rbackward_reference(x, w, mean, invstd, gy, rgy, rx, sum_rx_xhat, sum_rx, rw, need_gx):
    w1 = _ones_if_none(w, x)
    m = x.numel() // x.shape[1]
    # the terms linear in gy: bnb(R(gy)), with sum(R(gy) xhat) = part of R(dw), sum(R(gy)) = R(db)
    rgx, r_gw, r_gb = _bnb(rgy, x, w1, None, None, mean, invstd, True, 0.0, [need_gx, True, True])
    if rx is None and rw is None:
        return rgx, r_gw, r_gb
    _, gw, gb = _bnb(gy, x, w1, None, None, mean, invstd, True, 0.0, [False, True, True])
    m1, m2 = gb / m, gw / m  # mean(gy), mean(gy xhat)
    s = invstd
    r_ws = (rw.to(s.dtype) * s) if rw is not None else torch.zeros_like(s)  # R(w invstd) ...
    g_rxh = torch.zeros_like(s)  # sum(gy R(xhat))
    if rx is not None:
        a, mr = sum_rx_xhat / m, sum_rx / m  # mean(xhat rx), mean(rx)
        r_ws = r_ws - w1 * s * s * a  # ... + w R(invstd)
        # sum(gy rx) as the "weight grad" of a batch norm with mean 0, invstd 1: one fused reduction
        s_gy_rx = _bnb(gy, rx, None, None, None, torch.zeros_like(s), torch.ones_like(s), True, 0.0,
                       [False, True, False])[1]
        g_rxh = s * (s_gy_rx - a * gw - mr * gb)
    r_gw = r_gw + g_rxh
    if not need_gx:
        return None, r_gw, r_gb
    # dx = w invstd (gy - m1 - xhat m2); R of it beyond bnb(R(gy)):
    #   R(w invstd) (gy - m1 - xhat m2) - w invstd (xhat sum(gy R(xhat)) / M + m2 R(xhat))
    ws_ = w1 * s
    c_xhat = -r_ws * m2 - ws_ * g_rxh / m
    const = -r_ws * m1
    rgx = rgx.addcmul_(gy, per_channel(r_ws, x))
    if rx is not None:  # R(xhat) = s rx - s mr - s a xhat
        rgx = rgx.addcmul_(rx, per_channel(-ws_ * m2 * s, x))
        c_xhat = c_xhat + ws_ * m2 * s * a
        const = const + ws_ * m2 * s * mr
    return affine(rgx, x, c_xhat * s, const - c_xhat * s * mean), r_gw, r_gb


def _cpp_rforward(x, w, mean, invstd, rx, rw, rb):
    ry, sx_rx, s_rx = torch.ops.metafast.batch_norm_rforward_cxx(x, w, mean, invstd, rx, rw, rb)
    return (ry, sx_rx, s_rx) if rx is not None else (ry, None, None)


def _cpp_rbackward(x, w, mean, invstd, gy, rgy, rx, sum_rx_xhat, sum_rx, rw, need_gx):
    rgx, r_gw, r_gb = torch.ops.metafast.batch_norm_rbackward_cxx(x, w, mean, invstd, gy, rgy, rx, sum_rx_xhat,
                                                                   sum_rx, rw, need_gx)
    return (rgx if need_gx else None), r_gw, r_gb


_backend.register("batch_norm_rop", "cpp", serves=lambda *maps: cpu_maps_ok(maps), rforward=_cpp_rforward,
                  rbackward=_cpp_rbackward)
_TORCH = _backend.register("batch_norm_rop", "torch", rforward=rforward_reference, rbackward=rbackward_reference)


def _dispatch(maps, backend: Optional[str]):
    impl = _backend.dispatch("batch_norm_rop", maps[0], backend)
    return impl if impl is _TORCH or impl.serves(*maps) else _TORCH


def rforward(x: Tensor, w: Optional[Tensor], mean: Tensor, invstd: Tensor, rx: Optional[Tensor],
             rw: Optional[Tensor] = None, rb: Optional[Tensor] = None,
             backend: Optional[str] = None) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    if rx is None and rw is None:
        raise ValueError("batch_norm_rop.rforward: rx or rw must be given (R(y) is zero otherwise)")
    if (rw is None) != (rb is None):
        raise ValueError("batch_norm_rop.rforward: rw and rb must be given together")
    return _dispatch((x, rx), backend).rforward(x, w, mean, invstd, rx, rw, rb)


def rbackward(x: Tensor, w: Optional[Tensor], mean: Tensor, invstd: Tensor, gy: Tensor, rgy: Tensor,
              rx: Optional[Tensor] = None, sum_rx_xhat: Optional[Tensor] = None, sum_rx: Optional[Tensor] = None,
              rw: Optional[Tensor] = None, need_gx: bool = True,
              backend: Optional[str] = None) -> Tuple[Optional[Tensor], Tensor, Tensor]:
    if rx is not None and (sum_rx_xhat is None or sum_rx is None):
        raise ValueError("batch_norm_rop.rbackward: sum_rx_xhat and sum_rx (rforward's) must be given with rx")
    return _dispatch((x, gy, rgy, rx), backend).rbackward(x, w, mean, invstd, gy, rgy, rx, sum_rx_xhat, sum_rx, rw,
                                                          need_gx)
