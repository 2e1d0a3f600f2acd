"""The whole MAML inner loop of an MLP for all T tasks as one op, with the exact meta-gradient.

``fused_inner_loop(theta, lr, sx, sy, qx, qy, dims, steps, loss, first_order=False, backend=None)``
    MLP of L = len(dims) - 1 <= 4 linear layers (ReLU after all but the last, every d <= 256), flat
    meta-parameters theta [P] in nn.Sequential order (W_1 [d1, d0] row-major, b_1, ..., W_L, b_L).
    Per task t: W_0 = theta, W_{k+1} = W_k - lr_k * grad L_s(W_k) for k < steps; returns
    (query_loss [T] = L_q(W_K), support_loss [T] = L_s(W_{K-1}), fast [T, P] = W_K,
    query_out [T, Nq, dL]). lr: a float, a list of ``steps`` floats, or a [P] tensor (Meta-SGD: the
    same per-parameter rates every step, differentiated). loss: "mse" (targets [T, N, dL]) or
    "cross_entropy" (int64 labels [T, N]). query_loss is differentiable w.r.t. theta and a tensor lr
    (second order unless first_order; once: the meta-gradient itself is not differentiable); the
    other outputs are not.

The reverse (see kernels/fused_inner_loop.py for the derivation):
    Wbar_K = gq * grad L_q(W_K);  for k = K-1..0: lrbar -= sum_t Wbar_{k+1} * g_k (Meta-SGD),
    Wbar_k = Wbar_{k+1} - H_s(W_k) (lr_k Wbar_{k+1})  (H by R-operators; dropped when first_order);
    thetabar = sum_t Wbar_0.

Backends (``backend=``, else metafast._backend's choice): "triton" (kernels/fused_inner_loop.py, one
program per task; CPU tensors under TRITON_INTERPRET=1), "cuda" and "cpp" (the C++ extension's
``metafast::fused_inner_loop_cxx`` / ``fused_inner_loop_backward_cxx`` with their CUDA and C++ CPU
kernels; eager calls go through ``metafast::fused_inner_loop_autograd``, one C++ autograd node around
them), "torch" (:func:`fused_inner_loop_reference`, batched PyTorch ops, any float dtype).
"""
import numbers
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import _backend
from .theta_view import ThetaView

__all__ = ["fused_inner_loop", "fused_meta_loss", "fused_inner_loop_reference", "fused_inner_loop_backward_reference",
           "eligible", "num_params", "check_args", "check_labels", "Checked", "eager_meta_loss", "runs_eager_node",
           "FusedInnerLoopResult", "MAX_LAYERS", "MAX_DIM"]

MAX_LAYERS = 4
MAX_DIM = 256
LOSS_KINDS = {"mse": 0, "cross_entropy": 1}
_FLOAT_DTYPES = (torch.float32, torch.float64)
_EAGER_NODE = ("cpp", "cuda")  # the backends whose eager calls take the C++ autograd node (eager_meta_loss)


class FusedInnerLoopResult(NamedTuple):
    query_loss: Tensor     # [T], differentiable
    support_loss: Tensor   # [T], the last inner step's support loss
    fast: Tensor           # [T, P] adapted weights W_K
    query_out: Tensor      # [T, Nq, dL] the MLP's output on the query set at W_K


def eligible(dims: Sequence[int]) -> Tuple[bool, str]:
    """Whether the fused path supports an MLP with these layer widths, and why not when it does not."""
    try:
        dims = [int(d) for d in dims]
    except (TypeError, ValueError):
        return False, f"dims must be a sequence of ints, got {dims!r}"
    if len(dims) < 2:
        return False, f"an MLP needs at least one layer (dims [d0, d1, ...]), got {dims}"
    if len(dims) - 1 > MAX_LAYERS:
        return False, f"{len(dims) - 1} linear layers; the fused inner loop supports at most {MAX_LAYERS}"
    if min(dims) < 1:
        return False, f"every width must be >= 1, got {dims}"
    if max(dims) > MAX_DIM:
        return False, f"width {max(dims)} exceeds {MAX_DIM}, the largest the fused inner loop supports"
    return True, f"{len(dims) - 1} layer(s), widths {dims}"


def num_params(dims: Sequence[int]) -> int:
    """P, the flat parameter count of an MLP with these widths (weights and biases)."""
    return sum(dims[i + 1] * (dims[i] + 1) for i in range(len(dims) - 1))


# --------------------------------------------------------------------------------------------
# Reference (batched PyTorch): the test oracle and the "torch" backend
# --------------------------------------------------------------------------------------------
def _layers(w: Tensor, dims: Sequence[int]) -> List[Tuple[Tensor, Tensor]]:
    """[T, P] -> per layer (W [T, d_out, d_in], b [T, d_out]) views."""
    out, off = [], 0
    for din, dout in zip(dims[:-1], dims[1:]):
        W = w[:, off:off + dout * din].view(-1, dout, din)
        off += dout * din
        out.append((W, w[:, off:off + dout]))
        off += dout
    return out


def _flat(parts: List[Tuple[Tensor, Tensor]]) -> Tensor:
    return torch.cat([t.flatten(1) for pair in parts for t in pair], dim=1)


def _forward(w: Tensor, x: Tensor, dims):
    """Returns (hs: inputs of every layer, zs: pre-activations of every layer)."""
    hs, zs = [x], []
    layers = _layers(w, dims)
    for i, (W, b) in enumerate(layers):
        z = torch.baddbmm(b.unsqueeze(1), hs[-1], W.transpose(1, 2))
        zs.append(z)
        if i < len(layers) - 1:
            hs.append(torch.relu(z))
    return hs, zs


def _loss_grad(z: Tensor, y: Tensor, kind: int):
    """(per-task loss [T], d loss / d z)."""
    N = z.shape[1]
    if kind == 0:
        diff = z - y
        m = N * z.shape[2]
        return diff.pow(2).flatten(1).sum(1) / m, diff * (2.0 / m)
    lsm = torch.log_softmax(z, -1)
    loss = -lsm.gather(-1, y.unsqueeze(-1)).squeeze(-1).sum(1) / N
    onehot = torch.nn.functional.one_hot(y, z.shape[-1]).to(z.dtype)
    return loss, (lsm.exp() - onehot) * (1.0 / N)


def _backward(w: Tensor, hs, zs, dz: Tensor, dims):
    """(gradient [T, P], dzs: d loss / d z of every layer)."""
    layers = _layers(w, dims)
    grads, dzs = [None] * len(layers), [None] * len(layers)
    for i in range(len(layers) - 1, -1, -1):
        dzs[i] = dz
        grads[i] = (torch.bmm(dz.transpose(1, 2), hs[i]), dz.sum(1))
        if i > 0:
            dz = torch.bmm(dz, layers[i][0]) * (zs[i - 1] > 0).to(dz.dtype)
    return _flat(grads), dzs


def _hvp(w: Tensor, v: Tensor, hs, zs, dzs, y: Tensor, kind: int, dims) -> Tensor:
    """H_s(w) v by R-operators of the support forward/backward (hs, zs, dzs recorded at w)."""
    layers, vl = _layers(w, dims), _layers(v, dims)
    n = len(layers)
    rhs = [None]
    rz = None
    for i in range(n):
        VW, Vb = vl[i]
        rz = torch.baddbmm(Vb.unsqueeze(1), hs[i], VW.transpose(1, 2))
        if i > 0:
            rz = rz + torch.bmm(rhs[i], layers[i][0].transpose(1, 2))
        if i < n - 1:
            rhs.append(rz * (zs[i] > 0).to(rz.dtype))
    z = zs[-1]
    if kind == 0:
        rdz = rz * (2.0 / (z.shape[1] * z.shape[2]))
    else:
        p = torch.softmax(z, -1)
        rdz = p * (rz - (p * rz).sum(-1, keepdim=True)) * (1.0 / z.shape[1])
    out = [None] * n
    for i in range(n - 1, -1, -1):
        rdW = torch.bmm(rdz.transpose(1, 2), hs[i])
        if i > 0:
            rdW = rdW + torch.bmm(dzs[i].transpose(1, 2), rhs[i])
        out[i] = (rdW, rdz.sum(1))
        if i > 0:
            rdh = torch.bmm(rdz, layers[i][0]) + torch.bmm(dzs[i], vl[i][0])
            rdz = rdh * (zs[i - 1] > 0).to(rdh.dtype)
    return _flat(out)


def _lr_at(lr: Tensor, k: int, lr_per_param: bool):
    return lr if lr_per_param else lr[k]


def fused_inner_loop_reference(theta: Tensor, lr: Tensor, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor,
                               dims: Sequence[int], steps: int, loss_kind: int, lr_per_param: bool,
                               save_for_backward: bool):
    """The contract's forward in batched PyTorch ops (no autograd graph is needed or built):
    (query_loss [T], support_loss [T], fast [T, P], query_out [T, Nq, dL], saved [T, K, P] or empty)."""
    dims = [int(d) for d in dims]
    T = sx.shape[0]
    w = theta.unsqueeze(0).expand(T, -1)
    traj = []
    support_loss = theta.new_zeros(T)
    with torch.no_grad():
        for k in range(steps):
            traj.append(w)
            hs, zs = _forward(w, sx, dims)
            support_loss, dz = _loss_grad(zs[-1], sy, loss_kind)
            g, _ = _backward(w, hs, zs, dz, dims)
            w = w - _lr_at(lr, k, lr_per_param) * g
        _, zs = _forward(w, qx, dims)
        query_loss, _ = _loss_grad(zs[-1], qy, loss_kind)
        saved = torch.stack(traj, 1).contiguous() if save_for_backward else theta.new_empty(0)
    return query_loss, support_loss, w.contiguous(), zs[-1].contiguous(), saved


def fused_inner_loop_backward_reference(grad_query_loss: Tensor, theta: Tensor, lr: Tensor, sx: Tensor, sy: Tensor,
                                        qx: Tensor, qy: Tensor, saved: Tensor, dims: Sequence[int], steps: int,
                                        loss_kind: int, lr_per_param: bool, first_order: bool):
    """The contract's backward in batched PyTorch ops: (grad_theta [P], grad_lr [P] or empty).
    An empty ``saved`` recomputes the trajectory."""
    dims = [int(d) for d in dims]
    with torch.no_grad():
        if saved.numel() == 0:
            saved = fused_inner_loop_reference(theta, lr, sx, sy, qx, qy, dims, steps, loss_kind, lr_per_param,
                                               True)[4]
        K = steps
        w = saved[:, K - 1]
        hs, zs = _forward(w, sx, dims)
        g, _ = _backward(w, hs, zs, _loss_grad(zs[-1], sy, loss_kind)[1], dims)
        w = w - _lr_at(lr, K - 1, lr_per_param) * g
        hs, zs = _forward(w, qx, dims)
        _, dq = _loss_grad(zs[-1], qy, loss_kind)
        wbar, _ = _backward(w, hs, zs, dq * grad_query_loss.view(-1, 1, 1).to(dq.dtype), dims)
        grad_lr = theta.new_zeros(theta.shape) if lr_per_param else theta.new_empty(0)
        if lr_per_param or not first_order:
            for k in range(K - 1, -1, -1):
                w = saved[:, k]
                hs, zs = _forward(w, sx, dims)
                g, dzs = _backward(w, hs, zs, _loss_grad(zs[-1], sy, loss_kind)[1], dims)
                if lr_per_param:
                    grad_lr -= (wbar * g).sum(0)
                if not first_order:
                    wbar = wbar - _hvp(w, _lr_at(lr, k, lr_per_param) * wbar, hs, zs, dzs, sy, loss_kind, dims)
    return wbar.sum(0), grad_lr


# --------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------
def _fwd_impl(theta, lr, sx, sy, qx, qy, dims, steps, loss_kind, lr_per_param, save_for_backward, backend):
    return tuple(_backend.implementation("fused_inner_loop", backend).forward(
        theta, lr, sx, sy, qx, qy, list(dims), steps, loss_kind, lr_per_param, save_for_backward))


def _bwd_impl(grad_query_loss, theta, lr, sx, sy, qx, qy, saved, dims, steps, loss_kind, lr_per_param, first_order,
              backend):
    return tuple(_backend.implementation("fused_inner_loop", backend).backward(
        grad_query_loss.contiguous(), theta, lr, sx, sy, qx, qy, saved, list(dims), steps, loss_kind, lr_per_param,
        first_order))


_SECOND_ORDER = ("fused_inner_loop: the meta-gradient supports one backward; second derivatives through it "
                 "(create_graph=True followed by another backward) are not supported")


@torch.library.custom_op("metafast::fused_inner_loop", mutates_args=())
def _fwd_op(theta: Tensor, lr: Tensor, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, dims: List[int], steps: int,
            loss_kind: int, lr_per_param: bool, save_for_backward: bool, first_order: bool,
            backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _fwd_impl(theta, lr, sx, sy, qx, qy, dims, steps, loss_kind, lr_per_param, save_for_backward, backend)


@_fwd_op.register_fake
def _(theta, lr, sx, sy, qx, qy, dims, steps, loss_kind, lr_per_param, save_for_backward, first_order, backend):
    T, Nq, P = sx.shape[0], qx.shape[1], theta.shape[0]
    if not save_for_backward:
        saved = theta.new_empty(0)
    else:
        saved = theta.new_empty(_backend.implementation("fused_inner_loop", backend).saved_shape(
            dims, T, sx.shape[1], steps, loss_kind, lr_per_param, theta))
    return (theta.new_empty(T), theta.new_empty(T), theta.new_empty(T, P), theta.new_empty(T, Nq, dims[-1]), saved)


def _trajectory_shape(dims, T: int, Ns: int, steps: int, loss_kind: int, lr_per_param: bool, theta: Tensor):
    """The saved output of the Triton and PyTorch forwards: the trajectory W_0..W_{K-1}, [T, K, P]."""
    return T, steps, theta.shape[0]


def _cxx_saved_numel(dims, T: int, Ns: int, steps: int, loss_kind: int, lr_per_param: bool, theta: Tensor) -> int:
    """Elements of the C++ op's opaque saved output (csrc/fused_inner_loop.h, Plan): per task the
    trajectory W_1..W_{K-1}, the query gradient, the last inner step's gradient (Meta-SGD only), the
    support activations and loss gradients, and the softmax for cross-entropy; on the CPU for whole
    task groups of one task vector's worth of lanes (kTaskVecBytes = 32, csrc/fused_inner_loop_cpu.h)."""
    P = num_params(dims)
    per_task = ((steps + bool(lr_per_param)) * P + 2 * Ns * sum(dims[1:])
                + (Ns * dims[-1] if loss_kind == LOSS_KINDS["cross_entropy"] else 0))
    if theta.device.type == "cuda":
        return T * per_task
    lanes = 32 // theta.element_size()
    return -(-T // lanes) * lanes * per_task


_CXX = dict(forward=lambda *a: torch.ops.metafast.fused_inner_loop_cxx(*a),
            backward=lambda *a: torch.ops.metafast.fused_inner_loop_backward_cxx(*a), saved_shape=_cxx_saved_numel)
_TRITON = "metafast.kernels.fused_inner_loop"  # imported on first use: needs triton
_backend.register("fused_inner_loop", "cuda", **_CXX)
_backend.register("fused_inner_loop", "cpp", **_CXX)
_backend.register("fused_inner_loop", "triton", forward=f"{_TRITON}:fused_inner_loop_fwd",
                  backward=f"{_TRITON}:fused_inner_loop_bwd", saved_shape=_trajectory_shape)
_backend.register("fused_inner_loop", "torch", forward=fused_inner_loop_reference,
                  backward=fused_inner_loop_backward_reference, saved_shape=_trajectory_shape)


@torch.library.custom_op("metafast::fused_inner_loop_backward", mutates_args=())
def _bwd_op(grad_query_loss: Tensor, theta: Tensor, lr: Tensor, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor,
            saved: Tensor, dims: List[int], steps: int, loss_kind: int, lr_per_param: bool, first_order: bool,
            backend: str) -> Tuple[Tensor, Tensor]:
    return _bwd_impl(grad_query_loss, theta, lr, sx, sy, qx, qy, saved, dims, steps, loss_kind, lr_per_param,
                     first_order, backend)


@_bwd_op.register_fake
def _(grad_query_loss, theta, lr, sx, sy, qx, qy, saved, dims, steps, loss_kind, lr_per_param, first_order, backend):
    return theta.new_empty(theta.shape), theta.new_empty(theta.shape if lr_per_param else (0,))


def _fwd_setup(ctx, inputs, output):
    theta, lr, sx, sy, qx, qy, dims, steps, loss_kind, lr_per_param, save, first_order, backend = inputs
    ctx.save_for_backward(theta, lr, sx, sy, qx, qy, output[4])
    ctx.cfg = (list(dims), steps, loss_kind, lr_per_param, first_order, backend)
    ctx.mark_non_differentiable(*output[1:])


def _fwd_grad(ctx, g_query, _g_support, _g_fast, _g_out, _g_saved):
    theta, lr, sx, sy, qx, qy, saved = ctx.saved_tensors
    dims, steps, loss_kind, lr_per_param, first_order, backend = ctx.cfg
    if g_query is None:
        return (None,) * 13
    g_theta, g_lr = _bwd_op(g_query, theta, lr, sx, sy, qx, qy, saved, dims, steps, loss_kind, lr_per_param,
                            first_order, backend)
    return (g_theta, g_lr if lr_per_param else None) + (None,) * 11


def _bwd_grad(ctx, *grads):
    raise RuntimeError(_SECOND_ORDER)


_fwd_op.register_autograd(_fwd_grad, setup_context=_fwd_setup)
_bwd_op.register_autograd(_bwd_grad)


class _EagerFusedInnerLoop(torch.autograd.Function):
    """The same computation as the custom op, for eager calls on the Triton and PyTorch backends
    (the extension's eager calls take its C++ autograd node): torch.library's Python dispatch costs
    ~0.5 ms per forward+backward, as much as the whole fused sinusoid meta-step on CPU. The custom op
    stays what torch.compile traces."""

    @staticmethod
    def forward(ctx, theta, lr, sx, sy, qx, qy, cfg):
        dims, steps, loss_kind, lr_per_param, save, first_order, backend = cfg
        out = _fwd_impl(theta, lr, sx, sy, qx, qy, dims, steps, loss_kind, lr_per_param, save, backend)
        ctx.save_for_backward(theta, lr, sx, sy, qx, qy, out[4])
        ctx.cfg = cfg
        ctx.mark_non_differentiable(*out[1:])
        ctx.set_materialize_grads(False)  # no zero tensors for the outputs without a gradient ([T, P] fast...)
        return out

    @staticmethod
    def backward(ctx, g_query, *_):
        dims, steps, loss_kind, lr_per_param, _, first_order, backend = ctx.cfg
        if g_query is None:
            return (None,) * 7
        theta, lr, sx, sy, qx, qy, saved = ctx.saved_tensors
        with torch.no_grad():
            g_theta, g_lr = _bwd_impl(g_query, theta, lr, sx, sy, qx, qy, saved, dims, steps, loss_kind,
                                      lr_per_param, first_order, backend)
        if torch.is_grad_enabled():  # create_graph=True: a later backward through these must fail loudly
            g_theta, g_lr = _NoSecondOrder.apply(theta, g_theta, g_lr)
        return g_theta, (g_lr if lr_per_param else None), None, None, None, None, None


class _NoSecondOrder(torch.autograd.Function):
    """Identity on ``xs`` whose backward raises: the meta-gradient of the fused kernels has no
    derivative. ``anchor`` (theta) makes the outputs part of the graph, so the error is raised."""

    @staticmethod
    def forward(ctx, anchor, *xs):
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_SECOND_ORDER)


# --------------------------------------------------------------------------------------------
# Argument checks and the public function
# --------------------------------------------------------------------------------------------
LrArg = Union[float, Sequence[float], Tensor]


_STATIC: dict = {}  # (dims, steps, loss) that passed _check_static -> its result


class Checked(NamedTuple):
    """The op's configuration after :func:`check_args`: what the kernels take."""
    dims: List[int]
    steps: int
    kind: int        # LOSS_KINDS value
    lr: Tensor       # [steps] rates, or [P] (Meta-SGD)
    per_param: bool  # lr is [P]

    def check_labels(self, support_y: Tensor, query_y: Tensor) -> None:
        """What :func:`check_args` validated that can change between calls with the same shapes, dtypes
        and devices: the label values of cross-entropy (the kernels index logits by them)."""
        if self.kind == LOSS_KINDS["cross_entropy"]:
            check_labels(support_y, self.dims[-1], "support_y")
            check_labels(query_y, self.dims[-1], "query_y")


def check_args(theta, lr, sx, sy, qx, qy, dims, steps, loss) -> Checked:
    """Validate the arguments of :func:`fused_inner_loop` (errors name the argument)."""
    try:  # the same configuration every meta-step: validated once (types in the key: True == 1)
        key = (tuple(dims), tuple(map(type, dims)), type(steps), steps, loss)
        static = _STATIC.get(key)
    except TypeError:  # not iterable / not hashable: _check_static says what is wrong
        key, static = None, None
    if static is None:
        static = _check_static(dims, steps, loss)
        if key is not None:
            if len(_STATIC) > 64:
                _STATIC.clear()
            _STATIC[key] = static
    dims, steps, kind = static
    return Checked(*_check_tensors(theta, lr, sx, sy, qx, qy, dims, steps, kind))


def _check_static(dims, steps, loss) -> Tuple[List[int], int, int]:
    where = "fused_inner_loop"
    if not isinstance(dims, (list, tuple)) or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool)
                                                       for d in dims):
        raise TypeError(f"{where}: dims must be a list of ints [d0, d1, ..., dL], got {dims!r}")
    dims = [int(d) for d in dims]
    ok, why = eligible(dims)
    if not ok:
        raise ValueError(f"{where}: dims: {why}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"{where}: steps must be an int >= 1, got {steps!r}")
    steps = int(steps)
    if loss not in LOSS_KINDS:
        raise ValueError(f"{where}: loss must be one of {', '.join(map(repr, LOSS_KINDS))}, got {loss!r}")
    return dims, steps, LOSS_KINDS[loss]


def _check_tensors(theta, lr, sx, sy, qx, qy, dims, steps, kind) -> Tuple[List[int], int, int, Tensor, bool]:
    where = "fused_inner_loop"
    for name, x in (("theta", theta), ("support_x", sx), ("support_y", sy), ("query_x", qx), ("query_y", qy)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{where}: {name} must be a Tensor, got {type(x).__name__}")
    if theta.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{where}: theta must be float32 or float64, got {theta.dtype}")
    dtype, device = theta.dtype, theta.device
    P = num_params(dims)
    if theta.shape != (P,):
        raise ValueError(f"{where}: theta must have shape [P] = ({P},) for dims {dims} "
                         f"(sum of d_l * (d_(l-1) + 1)), got {tuple(theta.shape)}")
    d0, dL = dims[0], dims[-1]
    if sx.dim() != 3 or sx.shape[2] != d0 or sx.shape[1] < 1:
        raise ValueError(f"{where}: support_x must have shape [T, Ns, d0] with d0 = {d0}, Ns >= 1, "
                         f"got {tuple(sx.shape)}")
    T, Ns = sx.shape[:2]
    if qx.dim() != 3 or qx.shape[0] != T or qx.shape[2] != d0 or qx.shape[1] < 1:
        raise ValueError(f"{where}: query_x must have shape [T, Nq, d0] = ({T}, Nq, {d0}) with Nq >= 1, "
                         f"got {tuple(qx.shape)}")
    Nq = qx.shape[1]
    for name, x in (("support_x", sx), ("query_x", qx)):
        if x.dtype != dtype:
            raise TypeError(f"{where}: {name} must have theta's dtype {dtype}, got {x.dtype}")
    for name, x in (("support_x", sx), ("support_y", sy), ("query_x", qx), ("query_y", qy)):
        if x.device != device:
            raise ValueError(f"{where}: {name} must be on theta's device {device}, got {x.device}")
    for name, y, n in (("support_y", sy, Ns), ("query_y", qy, Nq)):
        if kind == 0:
            if y.dtype != dtype:
                raise TypeError(f"{where}: {name} must have theta's dtype {dtype} for mse, got {y.dtype}")
            if y.shape != (T, n, dL):
                raise ValueError(f"{where}: {name} must have shape [T, N, dL] = ({T}, {n}, {dL}), got {tuple(y.shape)}")
        else:
            if y.dtype != torch.int64:
                raise TypeError(f"{where}: {name} must hold int64 class labels for cross_entropy, got {y.dtype}")
            if y.shape != (T, n):
                raise ValueError(f"{where}: {name} must have shape [T, N] = ({T}, {n}), got {tuple(y.shape)}")
            check_labels(y, dL, f"{where}: {name}")
    if isinstance(lr, Tensor):
        if lr.shape != (P,):
            raise ValueError(f"{where}: a tensor lr must have shape [P] = ({P},) (Meta-SGD), got {tuple(lr.shape)}; "
                             "pass per-step rates as a list of floats")
        if lr.dtype != dtype:
            raise TypeError(f"{where}: lr must have theta's dtype {dtype}, got {lr.dtype}")
        if lr.device != device:
            raise ValueError(f"{where}: lr must be on theta's device {device}, got {lr.device}")
        return dims, steps, kind, lr, True
    if isinstance(lr, (list, tuple)):
        if len(lr) != steps or not all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in lr):
            raise ValueError(f"{where}: lr as a list must hold {steps} floats (one per step), got {lr!r}")
        rates = [float(x) for x in lr]
    elif isinstance(lr, numbers.Real) and not isinstance(lr, bool):
        rates = [float(lr)] * steps
    else:
        raise TypeError(f"{where}: lr must be a float, a list of {steps} floats or a [P] tensor, "
                        f"got {type(lr).__name__}")
    return dims, steps, kind, _rates_tensor(tuple(rates), dtype, device), False


def check_labels(y: Tensor, classes: int, name: str) -> None:
    """Class labels in [0, classes) (the error names ``name``): the kernels index logits by label, so
    every device is checked; skipped while torch.compile traces or a CUDA graph captures (a host sync
    would break either)."""
    if y.numel() and not torch.compiler.is_compiling() and not (y.is_cuda and torch.cuda.is_current_stream_capturing()):
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= classes:
            raise ValueError(f"{name}: labels must lie in [0, {classes}) for {classes} classes, "
                             f"got values in [{lo}, {hi}]")


_RATES: dict = {}


def _rates_tensor(rates: Tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The per-step rates as a tensor, made once per (rates, dtype, device): a host-to-device copy
    per meta-step would cost as much as a small fused step."""
    if torch.compiler.is_compiling():  # a traced constant, not a global cache
        return torch.tensor(rates, dtype=dtype, device=device)
    key = (rates, dtype, device)
    t = _RATES.get(key)
    if t is None:
        if len(_RATES) > 64:
            _RATES.clear()
        with torch.inference_mode(False):  # made in inference mode, it could not be saved for a later backward
            t = _RATES[key] = torch.tensor(rates, dtype=dtype, device=device)
    return t


def fused_inner_loop(theta: Tensor, lr: LrArg, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                     query_y: Tensor, dims: Sequence[int], steps: int, loss: str, first_order: bool = False,
                     backend: Optional[str] = None) -> FusedInnerLoopResult:
    """The MAML inner loop of an MLP over all tasks at once (see the module docstring)."""
    return _run(theta, None, lr, support_x, support_y, query_x, query_y, dims, steps, loss, first_order, backend)[1]


def fused_meta_loss(flat: Tensor, params: Sequence[Tensor], lr: LrArg, support_x: Tensor, support_y: Tensor,
                    query_x: Tensor, query_y: Tensor, dims: Sequence[int], steps: int, loss: str,
                    first_order: bool = False, backend: Optional[str] = None) -> Tuple[Tensor, FusedInnerLoopResult]:
    """``fused_inner_loop`` for meta-parameters kept in one flat buffer: ``flat`` [P] is the storage that
    ``params`` (the leaf tensors, in order) are views of (metafast.functional.flat.FlatParams). Returns
    (mean query loss, result); the meta-gradient goes to ``params`` (and a tensor ``lr``).

    With the C++ extension this is one autograd node (metafast::fused_inner_loop_autograd) whose
    backward runs without Python and fills every parameter's gradient; elsewhere the flat buffer is
    viewed differentiably through ``params``."""
    return _run(flat, list(params), lr, support_x, support_y, query_x, query_y, dims, steps, loss, first_order,
                backend)


def runs_eager_node(device: torch.device, backend: Optional[str] = None) -> bool:
    """Whether calls on ``device`` go through the C++ autograd node (:func:`eager_meta_loss`)."""
    return _backend.resolve("fused_inner_loop", device, backend) in _EAGER_NODE and not torch.compiler.is_compiling()


def eager_meta_loss(flat: Tensor, params: Sequence[Tensor], c: Checked, sx: Tensor, sy: Tensor, qx: Tensor,
                    qy: Tensor, first_order: bool, need_fast: bool = True) -> Tuple[Tensor, FusedInnerLoopResult]:
    """:func:`fused_meta_loss` through the C++ autograd node, for arguments that passed :func:`check_args`
    (BatchedMAML's fused path calls it directly once a batch signature has been checked, after
    :meth:`Checked.check_labels`). Without ``need_fast`` the
    result's ``fast`` is empty ([0, P]: not written, which saves a [T, P] store per call)."""
    out = torch.ops.metafast.fused_inner_loop_autograd(flat.contiguous(), params, c.lr.contiguous(), sx, sy, qx, qy,
                                                       c.dims, c.steps, c.kind, c.per_param, bool(first_order),
                                                       need_fast)
    return out[0], FusedInnerLoopResult(*out[1:])


def _run(theta, params, lr, sx, sy, qx, qy, dims, steps, loss, first_order,
         backend) -> Tuple[Tensor, FusedInnerLoopResult]:
    c = check_args(theta, lr, sx, sy, qx, qy, dims, steps, loss)
    chosen = _backend.resolve("fused_inner_loop", theta, backend)
    compiling = torch.compiler.is_compiling()
    if chosen in _EAGER_NODE and not compiling:  # as runs_eager_node
        return eager_meta_loss(theta, [theta] if params is None else params, c, sx, sy, qx, qy, first_order)
    dims, steps, kind, lr_t, per_param = c
    if params is not None and torch.is_grad_enabled():
        theta = ThetaView.apply(theta, *params)
    needs_grad = torch.is_grad_enabled() and (theta.requires_grad or (per_param and lr_t.requires_grad))
    args = (theta.contiguous(), lr_t.contiguous(), sx.contiguous(), sy.contiguous(), qx.contiguous(), qy.contiguous())
    if compiling:
        out = _fwd_op(*args, dims, steps, kind, per_param, needs_grad, bool(first_order), chosen)
    else:
        out = _EagerFusedInnerLoop.apply(*args, (dims, steps, kind, per_param, needs_grad, bool(first_order), chosen))
    return out[0].mean(), FusedInnerLoopResult(*out[:4])
