"""The input gradient of a 2-d convolution, with a faster CPU route for strided ones.

oneDNN computes the input gradient of a strided convolution over NCHW tensors up to 2x slower than
the same product as a transposed convolution over channels_last tensors plus the conversion back
(bit-identical results). Conv4's 14x14 -> 7x7 layer, inside the meta-step: 9.3 -> 6.7 ms with shared
weights over 160 images; grouped over 32 tasks it gains since the conversion back goes through
metafast.ops.to_nchw (PyTorch's own copy of the 8 MB result cost what the convolution saved; NOTES).
On maps below MIN_PIXELS the plain ``convolution_backward`` stays the route, as on other devices and
for other dtypes.
"""
from typing import Sequence

import torch
import torch.nn.functional as F

from ..ops.to_nchw import to_nchw

# Input maps below this many pixels take convolution_backward. Timed alone (2 threads, Conv4's layers,
# conversion by to_nchw): 14x14 maps 30-50% faster by the route, 7x7 10-25%, 4x4 about even or slower.
MIN_PIXELS = 49


def takes_channels_last_route(gy: torch.Tensor, x_shape: Sequence[int], stride: Sequence[int]) -> bool:
    return (gy.device.type == "cpu" and gy.dtype == torch.float32 and gy.dim() == 4
            and max(stride) > 1 and x_shape[2] * x_shape[3] >= MIN_PIXELS
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def input_grad(gy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, stride: Sequence[int],
               padding: Sequence[int], dilation: Sequence[int], groups: int) -> torch.Tensor:
    """d(conv2d(x, w))/dx applied to ``gy``, as a contiguous tensor shaped like ``x``."""
    if not takes_channels_last_route(gy, x.shape, stride):
        return torch.ops.aten.convolution_backward(gy, x, w, None, stride, padding, dilation, False, [0, 0], groups,
                                                   [True, False, False])[0]
    # the transposed convolution's output_padding recovers input rows/columns the stride skipped
    out_pad = [x.shape[2 + i] - ((gy.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                                 + dilation[i] * (w.shape[2 + i] - 1) + 1) for i in range(2)]
    gx = F.conv_transpose2d(gy.contiguous(memory_format=torch.channels_last), w, None, stride, padding, out_pad,
                            groups, dilation)
    return to_nchw(gx)


_channels_last_route = takes_channels_last_route  # the name tests/test_conv_grad.py uses
