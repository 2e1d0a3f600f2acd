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


# -- convolutions with per-task weights over the tasks-in-channels layout ----------------------------
# A "g" map [N, T*C, H, W] (metafast/functional/layers.py) convolves per-task weights [T, Cout, ...] either
# as ONE grouped convolution (groups = T * groups) or as T ungrouped convolutions, one per task on its
# channel slice (a strided view the convolution copies; the results are stacked back, one more copy).
# Which is faster depends on the map (bench/bench_conv_grad.py, bench/NOTES.md): on maps of a few pixels
# with many channels (ResNet-12's 4x4 stage: 512 x 512 x 3 x 3 weights per task, 80 pixels of 5 images)
# oneDNN spends more on converting the weights to and from its blocked layout than on the arithmetic,
# and its grouped backward-weights kernel is ~3x slower than T ungrouped ones there (1 thread: 44 vs
# 15 ms for the 4 tasks' weight gradients, 62 vs 44 ms of weight conversions); the loop took the 4x4
# forward and input gradients to 0.5-0.7x the grouped time, and the weight gradients to about even (0.6-0.8x
# before stacking the per-task gradients into one [T, ...] tensor, one more copy of them); the step on 1
# thread took 0.92x (bench/NOTES.md). From
# 8x8 maps on, the two were even on 1 thread and the grouped call faster on 2 threads, and the copies
# the loop adds grow with the map, so the grouped call stays there; so it does for small weights (Conv4's
# 64 x 64 x 3 x 3 over 32 tasks), where there is little to convert and T calls would cost more.
LOOP_MAX_PIXELS = 16  # input maps of at most this many pixels (H*W) ...
LOOP_MIN_WEIGHT = 1 << 18  # ... with per-task weights of at least this many elements loop over the tasks
TASK_LOOP = None  # None: ``per_task_loop`` decides; True / False force the loop / the grouped call (tests)


def per_task_loop(x: torch.Tensor, w: torch.Tensor, T: int) -> bool:
    """Whether convolutions with the per-task (or shared) weights ``w`` over the "g" map ``x`` run as a loop
    over the T tasks: on CPU float32 through oneDNN, for maps of at most LOOP_MAX_PIXELS pixels and
    weights of at least LOOP_MIN_WEIGHT elements per task."""
    if TASK_LOOP is not None:
        return bool(TASK_LOOP)
    per_task = w[0].numel() if w.dim() == 5 else w.numel()
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and x.shape[2] * x.shape[3] <= LOOP_MAX_PIXELS and per_task >= LOOP_MIN_WEIGHT
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def tasks_of(x: torch.Tensor, T: int):
    """[N, T*C, ...] -> T views [N, C, ...], task t's channels."""
    return x.view(x.shape[0], T, x.shape[1] // T, *x.shape[2:]).unbind(1)


def join_tasks(ys) -> torch.Tensor:
    """T tensors [N, C, ...] -> one contiguous [N, T*C, ...]."""
    y = torch.stack(ys, 1)
    return y.view(y.shape[0], -1, *y.shape[3:])


def task_conv(x: torch.Tensor, w: torch.Tensor, b, T: int, stride, padding, dilation, groups: int) -> torch.Tensor:
    """conv2d of the "g" map ``x`` with per-task weights ``w`` [T, Cout, Cin/groups, kh, kw] and bias ``b``
    [T, Cout] (or None), as a "g" map."""
    if per_task_loop(x, w, T):
        return join_tasks([F.conv2d(xt, w[t], None if b is None else b[t], stride, padding, dilation, groups)
                           for t, xt in enumerate(tasks_of(x, T))])
    return F.conv2d(x, w.reshape(-1, *w.shape[2:]), None if b is None else b.reshape(-1), stride, padding, dilation,
                    groups * T)


def task_conv_backward(gy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, T: int, stride, padding, dilation,
                       groups: int, need_gx: bool, need_gw: bool = True):
    """(d/dx or None, per-task d/dW [T, Cout, ...] or None) of per-task convolutions of the "g" map ``x``,
    applied to the "g" gradient ``gy``. ``w``: per-task weights [T, Cout, ...], or weights shared by every
    task [Cout, ...] whose per-task gradients are still asked for (the first inner step); with shared
    weights the input gradient is one ungrouped convolution over N*T images. The weight gradient does not
    read ``w``'s values."""
    shared = w.dim() == gy.dim()
    n = x.shape[0]
    gx = gw = None
    if shared and need_gx:
        gx = input_grad(gy.reshape(n * T, -1, *gy.shape[2:]), x.reshape(n * T, -1, *x.shape[2:]), w, stride, padding,
                        dilation, groups).view(x.shape)
        need_gx = False
    if not (need_gx or need_gw):
        return gx, gw
    if per_task_loop(x, w, T):
        mask = [need_gx, need_gw, False]
        outs = [_aten.convolution_backward(gt, xt, w if shared else w[t], None, stride, padding, dilation, False,
                                           [0, 0], groups, mask)
                for t, (gt, xt) in enumerate(zip(tasks_of(gy, T), tasks_of(x, T)))]
        if need_gx:
            gx = join_tasks([o[0] for o in outs])
        if need_gw:
            gw = torch.stack([o[1] for o in outs])
        return gx, gw
    # grouped: per-task weight grads need the grouped form, whose weight is read only for its shape (an
    # uninitialised contiguous buffer when the weights are shared: an expanded one would be copied first)
    wg = w.new_empty((T * w.shape[0], *w.shape[1:])) if shared else w.reshape(-1, *w.shape[2:])
    if need_gx and need_gw and not takes_channels_last_route(gy, x.shape, stride):
        gx, gw, _ = _aten.convolution_backward(gy, x, wg, None, stride, padding, dilation, False, [0, 0], groups * T,
                                               [True, True, False])
    else:
        if need_gx:
            gx = input_grad(gy, x, wg, stride, padding, dilation, groups * T)
        if need_gw:
            gw = _aten.convolution_backward(gy, x, wg, None, stride, padding, dilation, False, [0, 0], groups * T,
                                            [False, True, False])[1]
    return gx, None if gw is None else gw.view(T, -1, *gw.shape[1:])


def task_conv_weight_grad2(gy1: torch.Tensor, x1: torch.Tensor, gy2: torch.Tensor, x2: torch.Tensor,
                           w: torch.Tensor, T: int, stride, padding, dilation, groups: int) -> torch.Tensor:
    """Per-task d/dW [T, Cout, ...] of (gy1 at x1) + (gy2 at x2), "g" maps of the same shape: ONE weight
    gradient over the two batches stacked (the R-operator's R(gy) at x plus gy at R(x)), so oneDNN
    converts each gradient out of its blocked layout once, and no sum is taken afterwards."""
    return task_conv_backward(torch.cat([gy1, gy2]), torch.cat([x1, x2]), w, T, stride, padding, dilation, groups,
                              need_gx=False)[1]


_aten = torch.ops.aten
