"""A channels_last float32 map copied to contiguous NCHW: ``to_nchw(x)`` equals ``x.contiguous()``.

The strided input gradients of Conv2d on CPU come out of oneDNN channels_last
(metafast/functional/conv_grad.py) and are converted back here. Per sample that is the transpose of an
[H*W, C] matrix; PyTorch's copy reads it one strided element at a time, every output row's reads on a
different page once C is large (Conv4's task-grouped maps: C = 2048), at ~3.6 GB/s on the 2-core
development machine. Backends: "cpp" -- the extension's ``metafast::to_nchw_cxx``, a CPU kernel
moving 16 x 8 tiles through AVX2 register transposes (bench/bench_to_nchw.py: ~10x on Conv4's maps);
"torch" -- ``x.contiguous()``, also, whichever backend is chosen, for the other devices, dtypes and
layouts, and under autograd.
"""
from typing import Optional

import torch
from torch import Tensor

from .. import _backend

__all__ = ["to_nchw"]

def _cpp_serves(x: Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last) and not (x.requires_grad and torch.is_grad_enabled()))


_backend.register("to_nchw", "cpp", serves=_cpp_serves, forward=lambda x: torch.ops.metafast.to_nchw_cxx(x))
_TORCH = _backend.register("to_nchw", "torch", forward=lambda x: x.contiguous())


def to_nchw(x: Tensor, backend: Optional[str] = None) -> Tensor:
    """``x.contiguous()`` (see the module docstring)."""
    impl = _backend.dispatch("to_nchw", x, backend)
    if impl is not _TORCH and not impl.serves(x):
        impl = _TORCH
    return impl.forward(x)
