"""Batched layers beyond the chain's (metafast/functional/layers.py), each with its R-operators.

Elementwise activations (LeakyReLU, ELU, GELU, SiLU), a scalar factor, average pooling, and the
multi-input nodes of a module graph (residual add, concat). Conventions as in ``layers.Layer``:
forward returns (y, saved); backward (gx, per-task weight grads) built from differentiable ops;
rforward/rbackward the directional derivatives the exact second-order reverse needs.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from ..layers import Layer

_aten = torch.ops.aten


class LeakyReLU(Layer):
    """max(x, 0) + slope min(x, 0): piecewise linear, so both R-operators apply the forward's mask."""

    rop_in_place = True

    def __init__(self, module: nn.LeakyReLU, slots=()):
        super().__init__(module, slots)
        self.slope = float(module.negative_slope)
        # y has the sign of x for slope >= 0, so the mask can be read from y (and x overwritten)
        self.from_y = self.slope >= 0
        if not self.from_y:
            self.forward_in_place = self.backward_in_place = None

    def forward(self, ws, batched, x, rc):
        y = F.leaky_relu(x, self.slope)
        return y, (y if self.from_y else x)

    def _mask(self, g, saved, out=None):
        if out is None:
            return _aten.leaky_relu_backward(g, saved, self.slope, self.from_y)
        return _aten.leaky_relu_backward.grad_input(g, saved, self.slope, self.from_y, grad_input=out)

    def backward(self, ws, batched, saved, gy, need_gx, rc):
        return self._mask(gy, saved), []

    def forward_in_place(self, x):
        y = F.leaky_relu_(x, self.slope)
        return y, y

    def backward_in_place(self, saved, gy):
        return self._mask(gy, saved, out=gy), []

    def rforward(self, ws, batched, saved, rx, rws, rc):
        return self._mask(rx, saved, out=rx), None

    def rbackward(self, ws, batched, saved, gy, rgy, rsaved, rws, need_gx, rc):
        return self._mask(rgy, saved, out=rgy), []


class Smooth(Layer):
    """y = f(x) elementwise for a smooth f with closed-form f' and f'':
    dx = gy f'(x);  R(y) = f'(x) R(x);  R(dx) = R(gy) f'(x) + gy f''(x) R(x)."""

    def f(self, x):
        raise NotImplementedError

    def d1(self, x):
        raise NotImplementedError

    def d2(self, x):
        raise NotImplementedError

    def forward(self, ws, batched, x, rc):
        return self.f(x), x

    def backward(self, ws, batched, x, gy, need_gx, rc):
        return gy * self.d1(x), []

    def rforward(self, ws, batched, x, rx, rws, rc):
        return rx * self.d1(x), rx

    def rbackward(self, ws, batched, x, gy, rgy, rx, rws, need_gx, rc):
        r = rgy * self.d1(x)
        if rx is not None:
            r = r.addcmul_(gy * self.d2(x), rx)
        return r, []


class ELU(Smooth):
    """alpha (exp(x) - 1) for x <= 0, else x."""

    def __init__(self, module: nn.ELU, slots=()):
        super().__init__(module, slots)
        self.alpha = float(module.alpha)

    def f(self, x):
        return F.elu(x, self.alpha)

    def d1(self, x):
        return torch.where(x > 0, torch.ones_like(x), self.alpha * torch.exp(x))

    def d2(self, x):
        return torch.where(x > 0, torch.zeros_like(x), self.alpha * torch.exp(x))


_SQRT_2PI = math.sqrt(2 * math.pi)
_GELU_C, _GELU_A = math.sqrt(2 / math.pi), 0.044715


class GELU(Smooth):
    """x Phi(x) (exact) or its tanh approximation 0.5 x (1 + tanh(c (x + a x^3)))."""

    def __init__(self, module: nn.GELU, slots=()):
        super().__init__(module, slots)
        self.approximate = module.approximate

    def f(self, x):
        return F.gelu(x, approximate=self.approximate)

    def _tanh_parts(self, x):
        u = _GELU_C * (x + _GELU_A * x * x * x)
        t = torch.tanh(u)
        du = _GELU_C * (1 + 3 * _GELU_A * x * x)
        return t, du

    def d1(self, x):
        if self.approximate == "tanh":
            t, du = self._tanh_parts(x)
            return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du
        # Phi(x) + x phi(x)
        return 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * torch.exp(-0.5 * x * x) / _SQRT_2PI

    def d2(self, x):
        if self.approximate == "tanh":
            t, du = self._tanh_parts(x)
            s = 1 - t * t
            ddu = _GELU_C * 6 * _GELU_A * x
            return s * du + 0.5 * x * (s * ddu - 2 * t * s * du * du)
        # phi(x) (2 - x^2)
        return torch.exp(-0.5 * x * x) / _SQRT_2PI * (2 - x * x)


class SiLU(Smooth):
    """x sigmoid(x)."""

    def f(self, x):
        return F.silu(x)

    def d1(self, x):
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))

    def d2(self, x):
        s = torch.sigmoid(x)
        return s * (1 - s) * (2 + x * (1 - 2 * s))


class Scale(Layer):
    """x * c for a constant c (``x * 0.5``, ``x / 4`` in a forward)."""

    fresh_output = fresh_grad_input = True

    def __init__(self, c: float, what: str = ""):
        super().__init__(None, ())
        self.c = float(c)
        self.what = what

    def forward(self, ws, batched, x, rc):
        return x * self.c, None

    def backward(self, ws, batched, saved, gy, need_gx, rc):
        return gy * self.c, []

    def rforward(self, ws, batched, saved, rx, rws, rc):
        return rx * self.c, None

    def rbackward(self, ws, batched, saved, gy, rgy, rsaved, rws, need_gx, rc):
        return rgy * self.c, []

    def __repr__(self):
        return f"Scale({self.what or self.c})"


class _Pool(Layer):
    """A linear pooling: R(y) = pool(R(x)), R(dx) = pool's backward of R(gy)."""

    layout = "g"
    fresh_output = fresh_grad_input = True

    def rforward(self, ws, batched, saved, rx, rws, rc):
        return self.forward(ws, batched, rx, rc)[0], None

    def rbackward(self, ws, batched, saved, gy, rgy, rsaved, rws, need_gx, rc):
        return self.backward(ws, batched, saved, rgy, need_gx, rc)


class AvgPool2d(_Pool):
    def __init__(self, module: nn.AvgPool2d, slots=()):
        super().__init__(module, slots)
        m = module
        self.k = list(_pair(m.kernel_size))
        self.s = list(_pair(m.stride if m.stride is not None else m.kernel_size))
        self.p = list(_pair(m.padding))
        self.ceil, self.cip, self.div = m.ceil_mode, m.count_include_pad, m.divisor_override

    def forward(self, ws, batched, x, rc):
        return F.avg_pool2d(x, self.k, self.s, self.p, self.ceil, self.cip, self.div), x

    def backward(self, ws, batched, x, gy, need_gx, rc):
        return _aten.avg_pool2d_backward(gy, x, self.k, self.s, self.p, self.ceil, self.cip, self.div), []


class AdaptiveAvgPool2d(_Pool):
    def __init__(self, module: nn.AdaptiveAvgPool2d, slots=()):
        super().__init__(module, slots)
        self.size = module.output_size

    def forward(self, ws, batched, x, rc):
        return F.adaptive_avg_pool2d(x, self.size), x

    def backward(self, ws, batched, x, gy, need_gx, rc):
        return _aten._adaptive_avg_pool2d_backward(gy, x), []


class Add(Layer):
    """sum_i c_i x_i of same-shaped inputs (a residual sum; c = (1, -1) is a difference)."""

    multi = True
    fresh_output = True

    def __init__(self, coefs, what: str = "add"):
        super().__init__(None, ())
        self.coefs = [float(c) for c in coefs]
        self.what = what

    def _sum(self, xs):
        y = None
        for x, c in zip(xs, self.coefs):
            if x is None:
                continue
            if y is None:
                y = x * c if c != 1 else x.clone()  # always a new tensor: consumers may own it
            else:
                y = y.add(x, alpha=c) if torch.is_grad_enabled() else y.add_(x, alpha=c)
        return y

    def forward(self, ws, batched, xs, rc):
        shapes = {tuple(x.shape) for x in xs}
        if len(shapes) != 1:
            raise ValueError(f"{self.what}: the batched graph adds same-shaped tensors only, got shapes "
                             f"{sorted(shapes)} (broadcasting sums are not supported)")
        y = xs[0] * self.coefs[0] if self.coefs[0] != 1 else xs[0]
        for x, c in zip(xs[1:], self.coefs[1:]):
            y = torch.add(y, x, alpha=c)
        return y, None

    def _split(self, g, need_gx):
        return [(g if c == 1 else g * c) if n else None for c, n in zip(self.coefs, need_gx)]

    def backward(self, ws, batched, saved, gy, need_gx, rc):
        return self._split(gy, need_gx), []

    def rforward(self, ws, batched, saved, rxs, rws, rc):
        return self._sum(rxs), None

    def rbackward(self, ws, batched, saved, gy, rgy, rsaved, rws, need_gx, rc):
        return self._split(rgy, need_gx), []

    def __repr__(self):
        return f"Add({self.what})"


class Cat(Layer):
    """torch.cat of per-sample tensors along ``dim``: the channel dim in the tasks-in-channels layout
    (each task's channels stay together: [N, T, C_i, ...] views), any other dim in [T, N, ...]."""

    multi = True
    fresh_output = fresh_grad_input = True

    def __init__(self, dim: int, what: str = "cat"):
        super().__init__(None, ())
        self.dim = int(dim)
        self.layout = "g" if self.dim == 1 else "tn"
        self.what = what

    def _views(self, xs, T):
        if self.layout == "g":
            return [x.view(x.shape[0], T, x.shape[1] // T, *x.shape[2:]) for x in xs], 2
        d = self.dim if self.dim >= 0 else self.dim + xs[0].dim() - 1  # a sample has dim() - 1 dims
        return xs, d + 1

    def forward(self, ws, batched, xs, rc):
        views, d = self._views(xs, rc.T)
        y = torch.cat(views, d)
        if self.layout == "g":
            y = y.view(y.shape[0], -1, *y.shape[3:])
        return y, ([v.shape[d] for v in views], d)

    def _split(self, g, saved, need_gx, rc):
        sizes, d = saved
        if self.layout == "g":
            g = g.view(g.shape[0], rc.T, -1, *g.shape[2:])
        parts = g.split(sizes, d)
        if self.layout == "g":
            parts = [p.reshape(p.shape[0], -1, *p.shape[3:]) for p in parts]
        return [p.contiguous() if n else None for p, n in zip(parts, need_gx)]

    def backward(self, ws, batched, saved, gy, need_gx, rc):
        return self._split(gy, saved, need_gx, rc), []

    def rforward(self, ws, batched, saved, rxs, rws, rc):
        sizes, d = saved
        rxs = list(rxs)
        for i, r in enumerate(rxs):
            if r is None:  # an input that does not depend on the direction contributes zeros
                ref = next(x for x in rxs if x is not None)
                shape = list(ref.shape)
                if self.layout == "g":
                    shape[1] = sizes[i] * rc.T
                else:
                    shape[d] = sizes[i]
                rxs[i] = ref.new_zeros(shape)
        return self.forward(ws, batched, rxs, rc)[0], None

    def rbackward(self, ws, batched, saved, gy, rgy, rsaved, rws, need_gx, rc):
        return self._split(rgy, saved, need_gx, rc), []

    def __repr__(self):
        return f"Cat({self.what}, dim={self.dim})"


class LayerNorm(Layer):
    """nn.LayerNorm over the trailing ``normalized_shape`` of each sample, per-task affine weights.

    With xhat = (x - mean) s, s = 1/sqrt(var + eps) over the normalised dims, the normalisation's
    Jacobian is J(v) = s (v - mean(v) - xhat mean(v xhat)) (symmetric), so
        dx = J(gy w),  dw = sum gy xhat,  db = sum gy,  R(xhat) = J(R(x)),  R(s) = -s^2 mean(xhat R(x)),
        R(dx) = J(R(gy) w + gy R(w)) + R(s)/s J(gy w) - s (R(xhat) mean(gy w xhat) + xhat mean(gy w R(xhat))).
    """

    layout = "tn"
    fresh_output = fresh_grad_input = True

    def __init__(self, module: nn.LayerNorm, slots):
        super().__init__(module, slots)
        self.ns = tuple(module.normalized_shape)
        self.eps = module.eps
        self.dims = tuple(range(-len(self.ns), 0))

    def _w(self, w, x, batched):
        """A weight [*ns] (shared) or [T, *ns] viewed to broadcast over x [T, N, ..., *ns]."""
        return w if not batched else w.view(w.shape[0], *([1] * (x.dim() - 1 - len(self.ns))), *self.ns)

    def _mean(self, v):
        return v.mean(self.dims, keepdim=True)

    def _j(self, v, xhat, s):
        return s * (v - self._mean(v) - xhat * self._mean(v * xhat))

    def _per_task_sum(self, v):
        return v.sum(tuple(range(1, v.dim() - len(self.ns))))

    def forward(self, ws, batched, x, rc):
        if torch.is_grad_enabled():
            # differentiable statistics: the outer backward of the autograd path differentiates s too
            # (native_layer_norm's rstd output has no derivative)
            c = x - self._mean(x)
            s = torch.rsqrt(self._mean(c * c) + self.eps)
            xhat = c * s
        else:
            xhat, _, s = torch.native_layer_norm(x, self.ns, None, None, self.eps)
        y = xhat
        if ws:
            y = y * self._w(ws[0], x, batched)
            if len(ws) > 1:
                y = y + self._w(ws[1], x, batched)
        return y, (xhat, s)

    def backward(self, ws, batched, saved, gy, need_gx, rc):
        xhat, s = saved
        gx = None
        if need_gx:
            gx = self._j(gy * self._w(ws[0], gy, batched) if ws else gy, xhat, s)
        grads = []
        if ws:
            grads.append(self._per_task_sum(gy * xhat))
            if len(ws) > 1:
                grads.append(self._per_task_sum(gy))
        return gx, grads

    def rforward(self, ws, batched, saved, rx, rws, rc):
        xhat, s = saved
        rxh = None if rx is None else self._j(rx, xhat, s)
        ry = None
        if rxh is not None:
            ry = rxh * self._w(ws[0], rxh, batched) if ws else rxh
        if rws:
            t = xhat * self._w(rws[0], xhat, True)
            if len(rws) > 1:
                t = t + self._w(rws[1], xhat, True)
            ry = t if ry is None else ry + t
        return ry, (rx, rxh)

    def rbackward(self, ws, batched, saved, gy, rgy, rsaved, rws, need_gx, rc):
        xhat, s = saved
        rx, rxh = rsaved if rsaved is not None else (None, None)
        grads = []
        if ws:
            r_gw = rgy * xhat if rxh is None else rgy * xhat + gy * rxh
            grads.append(self._per_task_sum(r_gw))
            if len(ws) > 1:
                grads.append(self._per_task_sum(rgy))
        if not need_gx:
            return None, grads
        w = self._w(ws[0], gy, batched) if ws else None
        gxh = gy * w if ws else gy
        r_gxh = rgy * w if ws else rgy
        if rws:
            r_gxh = r_gxh + gy * self._w(rws[0], gy, True)
        rgx = self._j(r_gxh, xhat, s)
        if rx is not None:
            rs_over_s = -s * self._mean(xhat * rx)
            rgx = rgx + rs_over_s * self._j(gxh, xhat, s) - s * (
                rxh * self._mean(gxh * xhat) + xhat * self._mean(gxh * rxh))
        return rgx, grads


class Dropout(Layer):
    """nn.Dropout: the identity in eval mode; in training a per-task mask (one draw over [T, N, ...], so
    every task and sample gets its own), kept on the tape so the backward and R-operators apply the
    same mask. Masks come from the layer's own generator: the k-th training forward after
    ``reseed(seed)`` draws ``torch.rand(x.shape, generator=torch.Generator().manual_seed(seed))``'s k-th
    sample (in [T, N, ...] order, on the CPU), keep where >= p, scaled by 1/(1-p). The seed is drawn
    from torch's global generator when the layer is built, so torch.manual_seed makes runs repeat."""

    layout = "tn"  # masks indexed [T, N, ...] whatever layout the neighbours use

    def __init__(self, module: nn.Dropout, slots=()):
        super().__init__(module, slots)
        self.reseed(int(torch.randint(0, 2 ** 62, (1,)).item()))

    def reseed(self, seed: int) -> None:
        self.seed = int(seed)
        self.gen = torch.Generator().manual_seed(self.seed)

    def mask(self, shape, dtype, device):
        p = self.module.p
        keep = torch.rand(shape, generator=self.gen, dtype=dtype) >= p
        return (keep.to(dtype) / (1 - p)).to(device)

    def forward(self, ws, batched, x, rc):
        if not self.module.training:
            return x, None
        m = self.mask(x.shape, x.dtype, x.device)
        return x * m, m

    def _apply(self, g, m):
        return g if m is None else g * m

    def backward(self, ws, batched, m, gy, need_gx, rc):
        return self._apply(gy, m), []

    def rforward(self, ws, batched, m, rx, rws, rc):
        return self._apply(rx, m), None

    def rbackward(self, ws, batched, m, gy, rgy, rsaved, rws, need_gx, rc):
        return self._apply(rgy, m), []
