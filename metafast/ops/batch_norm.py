"""Batch norm's forward with batch statistics (training mode): ``forward(x, w, b, eps) -> (y, mean, invstd)``
with y = (x - mean) invstd w + b per channel (dim 1), mean and invstd = 1 / sqrt(biased variance + eps)
over (N, *spatial): what ``torch.ops.aten.native_batch_norm(x, w, b, None, None, True, 0.0, eps)`` returns.

Backends: "cpp" -- the extension's ``metafast::batch_norm_forward_cxx``, a CPU kernel (contiguous float32 /
float64, no autograd) that makes the three passes over each channel while it is in cache (~4x ATen's on
Conv4's task-grouped 14x14 maps: bench/bench_batch_norm.py); "torch" -- ``native_batch_norm``, for other
devices, dtypes and layouts, under autograd, and for channels of fewer than MIN_PER_CHANNEL values (where
ATen's kernel is as fast): inputs the C++ kernel does not serve run it whichever backend is chosen. :func:`forward_reference` is the formula in PyTorch ops (the tests' float64
reference).
"""
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _backend

__all__ = ["forward", "forward_reference", "cpu_maps_ok"]

# Values per channel (N * prod(spatial)) below which ATen's kernel runs: timed on [5, 2048, 2, 2]
# (20 per channel) it is as fast; at [5, 2048, 4, 4] (80) the C++ kernel is 1.7x.
MIN_PER_CHANNEL = 64


def forward_reference(x: Tensor, w: Optional[Tensor], b: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    dims = [0] + list(range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean = x.mean(dims)
    xc = x - mean.view(shape)
    invstd = torch.rsqrt((xc * xc).mean(dims) + eps)
    y = xc * invstd.view(shape)
    if w is not None:
        y = y * w.view(shape)
    if b is not None:
        y = y + b.view(shape)
    return y, mean, invstd


def cpu_maps_ok(maps: Sequence[Optional[Tensor]], params: Sequence[Optional[Tensor]] = ()) -> bool:
    """Whether the per-channel C++ CPU kernels (csrc/channel_maps.h; batch_norm, batch_norm_rop) serve these:
    ``maps`` (the first is x, None for absent ones) on the CPU, float32 / float64 [N, C, ...], all of x's
    dtype and contiguous; ``params`` (per-channel vectors) of x's dtype and device; no autograd through
    any of them."""
    x = maps[0]
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.dim() < 2:
        return False
    if any(t is not None and (t.dtype != x.dtype or not t.is_contiguous()) for t in maps):
        return False
    if any(t is not None and (t.dtype != x.dtype or t.device != x.device) for t in params):
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*maps, *params)))


def _cpp_serves(x: Tensor, w: Optional[Tensor], b: Optional[Tensor]) -> bool:
    return x.dim() >= 2 and x.numel() >= MIN_PER_CHANNEL * x.shape[1] and cpu_maps_ok((x,), (w, b))


def _torch_forward(x: Tensor, w: Optional[Tensor], b: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    return torch.ops.aten.native_batch_norm(x, w, b, None, None, True, 0.0, eps)


_backend.register("batch_norm", "cpp", serves=_cpp_serves,
                  forward=lambda x, w, b, eps: tuple(torch.ops.metafast.batch_norm_forward_cxx(x, w, b, eps)))
_TORCH = _backend.register("batch_norm", "torch", forward=_torch_forward, reference=forward_reference)


def forward(x: Tensor, w: Optional[Tensor], b: Optional[Tensor], eps: float,
            backend: Optional[str] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(y, mean, invstd) of batch norm with batch statistics (see the module docstring)."""
    impl = _backend.dispatch("batch_norm", x, backend)
    if impl is not _TORCH and not impl.serves(x, w, b):
        impl = _TORCH
    return impl.forward(x, w, b, eps)
