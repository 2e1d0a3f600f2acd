"""Layers executed over a batch of T tasks at once, each with a hand-written inner backward.

Activations travel in one of two layouts:
  "tn": [T, N, ...]            (task-major; Linear, vmap'd modules, the model output)
  "g":  [N, T*C, *spatial]     (tasks folded into channels; Conv2d runs as one grouped convolution,
                                BatchNorm as one batch_norm over T*C channels = per-task statistics)
A contiguous "g" tensor is bit-identical to [N*T, C, *spatial], so a convolution with weights shared
by all tasks (the first inner step) runs as one ordinary convolution with no copy.

Weights come either shared ([*shape], ``batched=False``) or per task ([T, *shape], ``batched=True``).
``backward`` returns (grad wrt the input, per-task grads [T, *shape] of each parameter) built from
differentiable ops, so that the outer backward of second-order MAML differentiates through it once
instead of running autograd's double backward of a create_graph=True pass.
"""
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from ..ops import batch_norm, batch_norm_rop
from ..ops.batch_norm_rop import affine, per_channel
from . import conv_grad
from .flat import ParamSlot

_HALF = (torch.float16, torch.bfloat16)


class RunCtx:
    """Per-call facts every layer needs. ``bn_stats``: None, or the BatchNorm layers' hook of this pass
    (MAML++ per-step running statistics, metafast/functional/step_stats.py): ``running(layer)`` gives the
    statistics [C] to normalise by (None: batch statistics), ``record(layer, x, mean, invstd, T)``
    receives the per-task batch statistics of a training pass."""

    __slots__ = ("T", "create_graph", "bn_stats")

    def __init__(self, T: int, create_graph: bool, bn_stats=None):
        self.T = T
        self.create_graph = create_graph
        self.bn_stats = bn_stats


def to_g(x: torch.Tensor, T: int) -> torch.Tensor:
    """[T, N, C, *sp] -> [N, T*C, *sp]"""
    return x.transpose(0, 1).reshape(x.shape[1], T * x.shape[2], *x.shape[3:])


def to_tn(x: torch.Tensor, T: int) -> torch.Tensor:
    """[N, T*C, *sp] -> [T, N, C, *sp] (a view)"""
    return x.view(x.shape[0], T, x.shape[1] // T, *x.shape[2:]).transpose(0, 1)


class Layer:
    """A batched layer. Those with R-operators (for MetaStep's exact second-order reverse) also define

        rforward(ws, batched, saved, rx, rws, rc) -> (R(y), rsaved)
        rbackward(ws, batched, saved, gy, rgy, rsaved, rws, need_gx, rc) -> (R(gx), R(per-task grads))

    the directional derivatives of forward/backward along per-task weight directions ``rws`` and the
    input's ``rx`` (None where the input does not depend on them); ``rsaved`` is what rbackward needs
    of the R-forward pass.
    """

    layout = "any"          # input layout the layer needs: "tn", "g" or "any" (kept as is)
    local_autograd = False  # backward by torch.autograd.grad on a recorded local graph
    # forward's output / backward's input gradient is a new tensor that the layer does not keep, so
    # the next layer may overwrite it (ReLU's in-place forms, outside autograd)
    fresh_output = False
    fresh_grad_input = False
    # forms that overwrite their input x / gy: forward_in_place(x) -> (y, saved) and
    # backward_in_place(saved, gy) -> (gx, grads), for fresh tensors outside autograd (None: none)
    forward_in_place = None
    backward_in_place = None
    # rforward/rbackward overwrite R(x) / R(gy) (a graph hands them an unshared copy where needed)
    rop_in_place = False
    # several inputs: forward(ws, batched, xs, rc), backward(..., need_gx: list) -> (gxs, grads),
    # rforward(..., rxs, ...), rbackward(..., need_gx: list) -> (rgxs, grads)   (graph nodes only)
    multi = False

    def __init__(self, module: nn.Module, slots: Sequence[ParamSlot] = ()):
        self.module = module
        self.slots = list(slots)

    def out_layout(self, in_layout: str) -> str:
        return in_layout

    def forward(self, ws: List[torch.Tensor], batched: bool, x: torch.Tensor, rc: RunCtx):
        raise NotImplementedError

    def backward(self, ws, batched: bool, saved, gy: torch.Tensor, need_gx: bool, rc: RunCtx):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.module})"


class Linear(Layer):
    layout = "tn"
    fresh_output = fresh_grad_input = True

    def forward(self, ws, batched, x, rc):
        w = ws[0]
        b = ws[1] if len(ws) > 1 else None
        x3 = x.reshape(rc.T, -1, x.shape[-1])
        if not batched:
            y = F.linear(x3, w, b)
        elif b is not None:
            y = torch.baddbmm(b.unsqueeze(1), x3, w.transpose(1, 2))
        else:
            y = torch.bmm(x3, w.transpose(1, 2))
        return y.view(*x.shape[:-1], y.shape[-1]), (x3, x.shape)

    def backward(self, ws, batched, saved, gy, need_gx, rc):
        # y = x W^T + b  =>  dW = gy^T x, db = sum_n gy, dx = gy W   (per task)
        x3, x_shape = saved
        gy3 = gy.reshape(rc.T, -1, gy.shape[-1])
        grads = [torch.bmm(gy3.transpose(1, 2), x3)]
        if len(ws) > 1:
            grads.append(gy3.sum(1))
        gx = None
        if need_gx:
            gx = (torch.bmm(gy3, ws[0]) if batched else gy3.matmul(ws[0])).view(x_shape)
        return gx, grads

    # R-operators (directional derivatives along per-task weight directions rws) for the exact
    # second-order reverse of MetaStep: R(y) = R(x) W^T + x R(W)^T + R(b).
    def rforward(self, ws, batched, saved, rx, rws, rc):
        x3, x_shape = saved
        ry = torch.bmm(x3, rws[0].transpose(1, 2))
        if len(rws) > 1:
            ry = ry + rws[1].unsqueeze(1)
        if rx is not None:
            rx3 = rx.reshape(x3.shape)
            ry = ry + (torch.bmm(rx3, ws[0].transpose(1, 2)) if batched else rx3.matmul(ws[0].t()))
        return ry.view(*x_shape[:-1], ry.shape[-1]), rx

    def rbackward(self, ws, batched, saved, gy, rgy, rx, rws, need_gx, rc):
        # R(dW) = R(gy)^T x + gy^T R(x);  R(db) = sum R(gy);  R(dx) = R(gy) W + gy R(W)
        x3, x_shape = saved
        gy3 = gy.reshape(rc.T, -1, gy.shape[-1])
        rgy3 = rgy.reshape(gy3.shape)
        rgw = torch.bmm(rgy3.transpose(1, 2), x3)
        if rx is not None:
            rgw = rgw + torch.bmm(gy3.transpose(1, 2), rx.reshape(x3.shape))
        grads = [rgw]
        if len(ws) > 1:
            grads.append(rgy3.sum(1))
        rgx = None
        if need_gx:
            rgx = (torch.bmm(rgy3, ws[0]) if batched else rgy3.matmul(ws[0])) + torch.bmm(gy3, rws[0])
            rgx = rgx.view(x_shape)
        return rgx, grads


class Conv2d(Layer):
    layout = "g"
    fresh_output = fresh_grad_input = True

    def __init__(self, module: nn.Conv2d, slots):
        super().__init__(module, slots)
        m = module
        self.stride, self.padding, self.dilation = list(m.stride), list(m.padding), list(m.dilation)
        self.groups = m.groups
        self.cin, self.cout = m.in_channels, m.out_channels

    def forward(self, ws, batched, x, rc):
        w = ws[0]
        b = ws[1] if len(ws) > 1 else None
        n, T = x.shape[0], rc.T
        if not batched and _channels_last(x):
            # "g" maps in channels_last memory do not view as [N*T, C, ...]: one grouped convolution
            # with the shared weights repeated per task (the layout the per-task weight grads need)
            ws = [w.repeat(T, *([1] * (w.dim() - 1))).view(T, *w.shape) for w in ws]
            return self.forward(ws, True, x, rc)
        if not batched:
            # shared weights: "g" layout == [N*T, C, H, W], one plain convolution
            y = F.conv2d(x.reshape(n * T, self.cin, *x.shape[2:]), w, b, self.stride, self.padding,
                         self.dilation, self.groups)
            y = y.view(n, T * self.cout, *y.shape[2:])
            return y, x
        return self._conv(x, w, b, T), x

    def _conv(self, x, w, b, T):
        """Per-task weights w [T, Cout, ...]: one grouped convolution or a loop over tasks (conv_grad)."""
        return conv_grad.task_conv(x, w, b, T, self.stride, self.padding, self.dilation, self.groups)

    def backward(self, ws, batched, saved, gy, need_gx, rc):
        gx, gw = self._backward(saved, ws[0], gy, need_gx, rc.T)
        return gx, self._weight_grads(gw, gy, ws, rc.T)

    def _backward(self, x, w, gy, need_gx, T, need_gw=True):
        """(input grad or None, per-task weight grads [T, Cout, ...] or None) at weights w (shared or per task)."""
        return conv_grad.task_conv_backward(gy, x, w, T, self.stride, self.padding, self.dilation, self.groups,
                                            need_gx, need_gw)

    def _weight_grads(self, gw, gy, ws, T):
        grads = [gw]
        if len(ws) > 1:
            grads.append(gy.sum((0, 2, 3)).view(T, self.cout))
        return grads

    # R-operators: the convolution is bilinear in (x, W), so
    # R(y) = conv(x, R(W)) + conv(R(x), W) + R(b), and R(dW), R(dx) are the backward of R(gy) at (x, W)
    # plus the backward of gy at (R(x), R(W)).
    def rforward(self, ws, batched, saved, rx, rws, rc):
        x = saved
        T = rc.T
        ry = self._conv(x, rws[0], rws[1] if len(rws) > 1 else None, T)
        if rx is not None:
            ry = ry.add_(self.forward(ws[:1], batched, rx, rc)[0])  # conv(R(x), W), no bias
        return ry, rx

    def rbackward(self, ws, batched, saved, gy, rgy, rx, rws, need_gx, rc):
        T = rc.T
        x = saved
        if rx is None:
            rgx, gw = self._backward(x, ws[0], rgy, need_gx, T)
        else:  # R(dW) = dW(R(gy) at x) + dW(gy at R(x)): one weight gradient over both batches
            rgx = self._backward(x, ws[0], rgy, need_gx, T, need_gw=False)[0]
            gw = conv_grad.task_conv_weight_grad2(rgy, x, gy, rx, rws[0], T, self.stride, self.padding,
                                                  self.dilation, self.groups)
        grads = self._weight_grads(gw, rgy, ws, T)
        if need_gx:
            rgx = rgx.add_(self._backward(x, rws[0], gy, True, T, need_gw=False)[0])
        return rgx, grads


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


class BatchNorm(Layer):
    """BatchNorm1d/2d with per-task batch statistics (transductive, as MAML uses it).

    In "g" layout a per-task, per-channel statistic is a per-channel statistic over T*C channels, so
    this is one native batch_norm, and its hand-written backward is native_batch_norm_backward
    (whose own derivative is the exact batch-norm double backward, mean/var dependence included).
    Running statistics are neither used nor updated, except in eval mode with
    ``track_running_stats=True``, where the stored statistics normalise every task, and where the pass's
    ``RunCtx.bn_stats`` hook (MAML++ per-step statistics) gives statistics to use or receives the batch
    statistics. Saved for the backward: (x, w, mean, invstd, running mean); mean is None with running
    statistics, the running mean None with batch statistics.
    """

    layout = "g"
    fresh_output = fresh_grad_input = True

    def __init__(self, module, slots):
        super().__init__(module, slots)
        self.eps = module.eps
        self.affine = module.affine

    def _running(self, rc):
        """(running mean, running var) [C] to normalise by, or None (batch statistics)."""
        if rc.bn_stats is not None:
            stats = rc.bn_stats.running(self)
            if stats is not None:
                return stats
        m = self.module
        if (not m.training) and m.track_running_stats and m.running_mean is not None:
            return m.running_mean, m.running_var
        return None

    def forward(self, ws, batched, x, rc):
        T = rc.T
        if self.affine:
            w, b = (ws[0].reshape(-1), ws[1].reshape(-1)) if batched else (ws[0].repeat(T), ws[1].repeat(T))
            if w.dtype in _HALF:
                # half inputs: float32 affine weights make batch_norm keep its statistics and the weight
                # grads in float32 (the mixed-dtype kernel); the output stays in the input's dtype
                w, b = w.float(), b.float()
        else:
            w = b = None
        running = self._running(rc)
        if running is not None:
            rm, rv = running[0].repeat(T), running[1].repeat(T)
            if x.dtype in _HALF:
                rm, rv = rm.float(), rv.float()
            # affine in x: dx = gy * w / sqrt(rv + eps)
            y = F.batch_norm(x, rm, rv, w, b, False, 0.0, self.eps)
            return y, (x, w, None, torch.rsqrt(rv + self.eps), rm)
        y, mean, invstd = batch_norm.forward(x, w, b, self.eps)
        if rc.bn_stats is not None:
            rc.bn_stats.record(self, x, mean.detach(), invstd.detach(), T)
        return y, (x, w, mean, invstd, None)

    def backward(self, ws, batched, saved, gy, need_gx, rc):
        x, w, mean, invstd, rm = saved
        T = rc.T
        if mean is None:  # eval with running statistics
            shape = (1, -1) + (1,) * (x.dim() - 2)
            dims = [0] + list(range(2, x.dim()))
            gx = (gy * (invstd if w is None else w * invstd).view(shape)).to(gy.dtype) if need_gx else None
            grads = []
            if self.affine:
                rm = rm.to(invstd.dtype)
                grads = [(gy * (x - rm.view(shape)) * invstd.view(shape)).sum(dims).view(T, -1),
                         gy.sum(dims).view(T, -1)]
            return gx, grads
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            gy, x, w, None, None, mean, invstd, True, self.eps, [need_gx, self.affine, self.affine])
        grads = [gw.view(T, -1), gb.view(T, -1)] if self.affine else []
        return gx, grads

    # R-operators with batch statistics: metafast/ops/batch_norm_rop.py (formulas, the C++ kernels).
    def rforward(self, ws, batched, saved, rx, rws, rc):
        x, w, mean, invstd, rm = saved
        if mean is None:
            return self._rforward_running(x, w, invstd, rm, rx, rws), rx
        rw, rb = (rws[0].reshape(-1), rws[1].reshape(-1)) if rws else (None, None)
        ry, sx_rx, s_rx = batch_norm_rop.rforward(x, w, mean, invstd, rx, rw, rb)
        return ry, (None if rx is None else (rx, sx_rx, s_rx))

    def rbackward(self, ws, batched, saved, gy, rgy, rstats, rws, need_gx, rc):
        x, w, mean, invstd, rm = saved
        T = rc.T
        if mean is None:
            return self._rbackward_running(x, w, invstd, rm, gy, rgy, rstats, rws, need_gx, rc)
        rx, sx_rx, s_rx = rstats if rstats is not None else (None, None, None)
        rgx, r_gw, r_gb = batch_norm_rop.rbackward(x, w, mean, invstd, gy, rgy, rx, sx_rx, s_rx,
                                                   rws[0].reshape(-1) if rws else None, need_gx)
        return rgx, ([r_gw.view(T, -1), r_gb.view(T, -1)] if self.affine else [])

    # Running statistics (rm: the running mean repeated per task): y = w invstd (x - rm) + b is affine in x
    # with constant invstd.
    def _rforward_running(self, x, w, invstd, rm, rx, rws):
        s = invstd
        ry = None if rx is None else rx * per_channel(s if w is None else w * s, rx)
        if rws:
            rw, rb = (r.reshape(-1).to(s.dtype) for r in rws)
            a = rw * s
            ry = affine(ry, x, a, rb - a * rm.to(s.dtype))
        return ry

    def _rbackward_running(self, x, w, invstd, rm, gy, rgy, rx, rws, need_gx, rc):
        # dx = gy w s, dw = sum(gy xhat), db = sum(gy);  R(xhat) = rx s
        T, s = rc.T, invstd
        dims = [0] + list(range(2, x.dim()))
        rgx = None
        if need_gx:
            rgx = rgy * per_channel(s if w is None else w * s, rgy)
            if rws:
                rgx = rgx.addcmul_(gy, per_channel(rws[0].reshape(-1).to(s.dtype) * s, x))
        grads = []
        if self.affine:
            xhat = (x - per_channel(rm.to(s.dtype), x)) * per_channel(s, x)
            r_gw = (rgy * xhat).sum(dims)
            if rx is not None:
                r_gw = r_gw + (gy * rx).sum(dims) * s
            grads = [r_gw.view(T, -1), rgy.sum(dims).view(T, -1)]
        return rgx, grads


class ReLU(Layer):
    rop_in_place = True

    def forward(self, ws, batched, x, rc):
        y = torch.relu(x)
        return y, y

    def backward(self, ws, batched, y, gy, need_gx, rc):
        return torch.ops.aten.threshold_backward(gy, y, 0.0), []

    # In-place forms, for a fresh x / gy outside autograd (BatchedModel decides): on Conv4's 14x14 maps
    # each saves an 8 MB allocation and its write.
    @staticmethod
    def forward_in_place(x):
        y = x.relu_()
        return y, y

    @staticmethod
    def backward_in_place(y, gy):
        return torch.ops.aten.threshold_backward.grad_input(gy, y, 0.0, grad_input=gy), []

    # ReLU is piecewise linear: both R-operators apply the same constant mask, in place: R(x) and
    # R(gy) are fresh outputs of the neighbouring layer that no layer keeps (each keeps its own input).
    def rforward(self, ws, batched, y, rx, rws, rc):
        return torch.ops.aten.threshold_backward.grad_input(rx, y, 0.0, grad_input=rx), None

    def rbackward(self, ws, batched, y, gy, rgy, rsaved, rws, need_gx, rc):
        return torch.ops.aten.threshold_backward.grad_input(rgy, y, 0.0, grad_input=rgy), []


class Tanh(Layer):
    def forward(self, ws, batched, x, rc):
        y = torch.tanh(x)
        return y, y

    def backward(self, ws, batched, y, gy, need_gx, rc):
        return gy * (1 - y * y), []

    def rforward(self, ws, batched, y, rx, rws, rc):
        return rx * (1 - y * y), rx

    def rbackward(self, ws, batched, y, gy, rgy, rx, rws, need_gx, rc):
        # dx = gy (1 - y^2)  =>  R(dx) = R(gy) (1 - y^2) - 2 gy y R(y),  R(y) = R(x) (1 - y^2)
        d = 1 - y * y
        return rgy * d - 2 * gy * y * (rx * d), []


class Sigmoid(Layer):
    def forward(self, ws, batched, x, rc):
        y = torch.sigmoid(x)
        return y, y

    def backward(self, ws, batched, y, gy, need_gx, rc):
        return gy * (y * (1 - y)), []

    def rforward(self, ws, batched, y, rx, rws, rc):
        return rx * (y * (1 - y)), rx

    def rbackward(self, ws, batched, y, gy, rgy, rx, rws, need_gx, rc):
        # dx = gy s(1-s)  =>  R(dx) = R(gy) s(1-s) + gy (1-2s) R(s),  R(s) = R(x) s(1-s)
        d = y * (1 - y)
        return rgy * d + gy * (1 - 2 * y) * (rx * d), []


class MaxPool2d(Layer):
    layout = "g"
    fresh_output = fresh_grad_input = True

    def __init__(self, module: nn.MaxPool2d, slots=()):
        super().__init__(module, slots)
        m = module
        self.k = list(_pair(m.kernel_size))
        self.s = list(_pair(m.stride if m.stride is not None else m.kernel_size))
        self.p, self.d, self.ceil = list(_pair(m.padding)), list(_pair(m.dilation)), m.ceil_mode

    def forward(self, ws, batched, x, rc):
        y, idx = F.max_pool2d(x, self.k, self.s, self.p, self.d, self.ceil, return_indices=True)
        return y, (x, idx)

    def backward(self, ws, batched, saved, gy, need_gx, rc):
        x, idx = saved
        return torch.ops.aten.max_pool2d_with_indices_backward(gy, x, self.k, self.s, self.p, self.d, self.ceil, idx), []

    # The argmax is locally constant: R(y) picks R(x) at it, and R(dx) routes R(gy) back through it.
    def rforward(self, ws, batched, saved, rx, rws, rc):
        _, idx = saved
        return rx.flatten(2).gather(2, idx.flatten(2)).view(idx.shape), None

    def rbackward(self, ws, batched, saved, gy, rgy, rsaved, rws, need_gx, rc):
        return self.backward(ws, batched, saved, rgy, need_gx, rc)


class Flatten(Layer):
    """nn.Flatten(1, -1) of each sample, in "tn" layout: [T, N, ...] -> [T, N, F] (a view when possible)."""

    layout = "tn"

    def forward(self, ws, batched, x, rc):
        return x.reshape(x.shape[0], x.shape[1], -1), x.shape

    def backward(self, ws, batched, shape, gy, need_gx, rc):
        return gy.reshape(shape), []

    def rforward(self, ws, batched, shape, rx, rws, rc):
        return (None if rx is None else rx.reshape(rx.shape[0], rx.shape[1], -1)), None

    def rbackward(self, ws, batched, shape, gy, rgy, rsaved, rws, need_gx, rc):
        return rgy.reshape(shape), []


class Stateless(Layer):
    """A parameter-free module applied to the whole batch (elementwise or per sample and channel);
    backward through a local autograd graph."""

    local_autograd = True

    def __init__(self, module, slots=(), layout="any"):
        super().__init__(module, slots)
        self.layout = layout

    def forward(self, ws, batched, x, rc):
        if not x.requires_grad:  # nothing upstream is adapted: no input grad will be asked for
            return self.module(x), None
        y = self.module(x)
        return y, (x, y)

    def backward(self, ws, batched, saved, gy, need_gx, rc):
        x, y = saved
        (gx,) = torch.autograd.grad(y, x, gy, create_graph=rc.create_graph, retain_graph=True)
        return gx, []


def _contains_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


class Generic(Layer):
    """Any other module, run per task through torch.func.vmap(functional_call) - correct, not fast.

    A module holding BatchNorm runs as a per-task loop instead: vmap's second-order gradients
    through batch norm are wrong in current torch. Backward through a local autograd graph.
    """

    layout = "tn"
    local_autograd = True

    def __init__(self, module: nn.Module, slots, loop: bool = False):
        super().__init__(module, slots)
        self.names = [n for n, _ in module.named_parameters()]
        # a loop also serves forwards vmap cannot run (control flow on tensor values)
        self.loop = loop or _contains_batchnorm(module)

    def _call(self, params, x):
        from torch.func import functional_call

        state = dict(zip(self.names, params))
        state.update(dict(self.module.named_buffers()))
        return functional_call(self.module, state, (x,))

    def forward(self, ws, batched, x, rc):
        T = rc.T
        if ws and not batched:  # per-task grads need per-task leaves: expand (a view, no copy)
            ws = [w.unsqueeze(0).expand(T, *w.shape) for w in ws]
        if self.loop:
            y = torch.stack([self._call([w[t] for w in ws], x[t]) for t in range(T)])
        else:
            from torch.func import vmap

            y = vmap(self._call, in_dims=(0, 0), randomness="different")(ws, x)
        return y, (x, ws, y)

    def backward(self, ws, batched, saved, gy, need_gx, rc):
        x, ws_used, y = saved
        inputs = list(ws_used)
        if need_gx:
            inputs.append(x)
        grads = torch.autograd.grad(y, inputs, gy, create_graph=rc.create_graph, retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, grads)]
        gx = grads[-1] if need_gx else None
        return gx, grads[:len(ws_used)]
