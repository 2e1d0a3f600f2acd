"""Per-task softmax cross-entropy for a batch of T tasks: ``logits [T, N, C]``, ``labels [T, N]``.

``task_cross_entropy`` returns one loss per task ([T]; [T, N] for ``reduction="none"``).
``task_cross_entropy_with_grad`` also returns ``dlogits = d sum(loss) / d logits``, which the batched
MAML executor uses to form the inner gradient by hand. Both are differentiable twice (second-order
MAML is exact through them).

Semantics
- Row loss: ``(1 - eps) * nll + eps * mean_c(-log softmax)``, as ``torch.nn.functional.cross_entropy``
  with ``label_smoothing=eps``. Rows whose label is ``ignore_index`` contribute nothing.
- ``"mean"`` divides each task's sum by its number of non-ignored rows; a task whose rows are all
  ignored has loss 0 and zero gradient (never NaN). ``"sum"`` sums, ``"none"`` gives ``[T, N]``
  with 0 on ignored rows.
- Dtypes: logits float16/bfloat16/float32/float64. Accumulation is float32 (float64 for float64
  logits). The loss comes back in float32 for float16/bfloat16 logits (a half-precision loss would
  throw away the accuracy of the accumulation), else in the logits dtype; ``dlogits`` and gradients
  w.r.t. logits are in the logits dtype.
- Labels are checked to lie in ``[0, C)`` (or equal ``ignore_index``): always on CPU; on CUDA with
  one host sync, skipped while a CUDA graph is being captured and when ``METAFAST_CHECK_LABELS=0``.
  The kernels never read out of bounds either way: an unchecked bad label gives that row NaN loss.

Backends (``backend=`` keyword, else metafast._backend's choice)
- ``"torch"``: :func:`task_cross_entropy_reference` (plain autograd). This is the CPU path.
- ``"triton"`` / ``"cuda"``: the custom ops ``metafast::task_cross_entropy`` (-> loss, dlogits,
  logsumexp) and ``metafast::task_cross_entropy_softmax_jvp`` calling the Triton kernels (kernels/)
  or the CUDA extension (``metafast::task_cross_entropy_*_cuda``, csrc/). One launch yields the loss
  and ``dlogits`` (saved), reading each row once while it fits one chunk of classes (4096) and
  twice beyond (online softmax, then the gradient). Backward is ``dlogits * grad_out``; its own
  derivative is the fused softmax Jacobian-vector product, whose derivative (third order) is plain
  PyTorch. ``"triton"`` also runs on CPU tensors under ``TRITON_INTERPRET=1`` (used by the tests).
"""
import numbers
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _backend

__all__ = [
    "task_cross_entropy",
    "task_cross_entropy_with_grad",
    "task_cross_entropy_reference",
    "task_cross_entropy_reference_with_grad",
]

REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------
# Checks and small helpers
# --------------------------------------------------------------------------------------------
def _check_args(logits, labels, label_smoothing, ignore_index, reduction) -> None:
    where = "task_cross_entropy"
    if not isinstance(logits, Tensor):
        raise TypeError(f"{where}: logits must be a Tensor [T, N, C], got {type(logits).__name__}")
    if not isinstance(labels, Tensor):
        raise TypeError(f"{where}: labels must be an int64 Tensor [T, N], got {type(labels).__name__}")
    if logits.dim() != 3:
        raise ValueError(f"{where}: logits must be a 3-D tensor [T, N, C], got shape {tuple(logits.shape)}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{where}: logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if logits.shape[2] < 1:
        raise ValueError(f"{where}: logits must have at least one class (C >= 1), got shape "
                         f"{tuple(logits.shape)}")
    if labels.dtype != torch.int64:
        raise TypeError(f"{where}: labels must have dtype torch.int64, got {labels.dtype}")
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"{where}: labels must have shape [T, N] = {tuple(logits.shape[:2])} to match "
                         f"logits {tuple(logits.shape)}, got {tuple(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"{where}: labels must be on logits' device {logits.device}, got {labels.device}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real) \
            or not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"{where}: label_smoothing must be a float in [0, 1), got {label_smoothing!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"{where}: ignore_index must be an int, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{where}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_label_range(labels: Tensor, num_classes: int, ignore_index: int) -> None:
    if labels.is_cuda:
        if os.environ.get("METAFAST_CHECK_LABELS", "1") == "0":
            return
        if torch.cuda.is_current_stream_capturing():
            return  # a host sync would break graph capture; the kernels yield NaN instead
    if labels.device.type == "meta":  # shapes only: no values to check
        return
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
    if torch.compiler.is_compiling():  # no host sync inside a compiled graph: assert on the device
        torch._assert_async(~bad.any(), "task_cross_entropy: labels must be class ids or ignore_index")
        return
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(f"task_cross_entropy: labels must be class ids in [0, {num_classes}) or "
                         f"ignore_index={ignore_index}, got {first}")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_weight(labels: Tensor, ignore_index: int, reduction: str, dtype: torch.dtype) -> Tensor:
    """[T, N] weight of each row's loss: 1/n_valid(task) for "mean" (n_valid clamped to 1 so an
    all-ignored task gives 0, not 0/0), 1 for "sum"/"none", 0 on ignored rows."""
    w = (labels != ignore_index).to(dtype)
    if reduction == "mean":
        w = w / w.sum(1, keepdim=True).clamp_min(1)
    return w.contiguous()


# --------------------------------------------------------------------------------------------
# Pure-PyTorch reference: test oracle, CPU kernel, benchmark baseline
# --------------------------------------------------------------------------------------------
def _reference_rows(logits: Tensor, labels: Tensor, label_smoothing: float, ignore_index: int):
    """(per-row loss [T, N] in the accumulation dtype, 0 on ignored rows; log-probs [T, N, C])."""
    logp = torch.log_softmax(logits.to(_acc_dtype(logits.dtype)), dim=-1)
    valid = labels != ignore_index
    nll = -logp.gather(-1, labels.masked_fill(~valid, 0).unsqueeze(-1)).squeeze(-1)
    if label_smoothing > 0:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    # where, not multiply: an ignored row's garbage never reaches the loss or the gradient
    return torch.where(valid, nll, torch.zeros_like(nll)), logp


def _reduce(rows: Tensor, labels: Tensor, ignore_index: int, reduction: str) -> Tensor:
    if reduction == "none":
        return rows
    total = rows.sum(1)
    if reduction == "sum":
        return total
    n_valid = (labels != ignore_index).sum(1).clamp_min(1)
    return total / n_valid.to(total.dtype)


def task_cross_entropy_reference(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0,
                                 ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Per-task cross-entropy with log_softmax + gather in plain PyTorch (differentiable any number
    of times). Same semantics and dtypes as :func:`task_cross_entropy`."""
    _check_args(logits, labels, label_smoothing, ignore_index, reduction)
    _check_label_range(labels, logits.shape[2], ignore_index)
    rows, _ = _reference_rows(logits, labels, float(label_smoothing), ignore_index)
    return _reduce(rows, labels, ignore_index, reduction)


def task_cross_entropy_reference_with_grad(logits: Tensor, labels: Tensor,
                                           label_smoothing: float = 0.0, ignore_index: int = -100,
                                           reduction: str = "mean") -> Tuple[Tensor, Tensor]:
    """(loss, dlogits) in plain PyTorch; dlogits = w * (softmax - smoothed one-hot) in closed form
    (w = 1/n_valid for "mean"), differentiable w.r.t. logits."""
    _check_args(logits, labels, label_smoothing, ignore_index, reduction)
    _check_label_range(labels, logits.shape[2], ignore_index)
    eps = float(label_smoothing)
    rows, logp = _reference_rows(logits, labels, eps, ignore_index)
    valid = labels != ignore_index
    target = torch.zeros_like(logp).scatter_(-1, labels.masked_fill(~valid, 0).unsqueeze(-1),
                                             1.0 - eps)
    if eps > 0:
        target = target + eps / logits.shape[2]
    w = _row_weight(labels, ignore_index, reduction, logp.dtype).unsqueeze(-1)
    dlogits = (w * (logp.exp() - target)).to(logits.dtype)
    return _reduce(rows, labels, ignore_index, reduction), dlogits


# --------------------------------------------------------------------------------------------
# Custom ops (CUDA extension or Triton)
# --------------------------------------------------------------------------------------------
def _cuda_softmax_jvp(logits, lse, v, row_scale):
    return torch.ops.metafast.task_cross_entropy_softmax_jvp_cuda(logits, lse, v.to(logits.dtype), row_scale)


_TRITON = "metafast.kernels.task_cross_entropy"  # imported on first use: needs triton
_backend.register("task_cross_entropy", "cuda", forward=lambda *a: torch.ops.metafast.task_cross_entropy_fwd_cuda(*a),
                  softmax_jvp=_cuda_softmax_jvp)
_backend.register("task_cross_entropy", "triton", forward=f"{_TRITON}:task_cross_entropy_fwd",
                  softmax_jvp=f"{_TRITON}:task_cross_entropy_softmax_jvp")
_backend.register("task_cross_entropy", "torch", reference=task_cross_entropy_reference,
                  reference_with_grad=task_cross_entropy_reference_with_grad)  # plain autograd, not the custom ops


@torch.library.custom_op("metafast::task_cross_entropy", mutates_args=())
def _tce_op(logits: Tensor, labels: Tensor, label_smoothing: float, ignore_index: int,
            reduction: str, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (loss [T] or [T, N], dlogits [T, N, C] = d sum(loss) / d logits, lse [T, N])."""
    _check_label_range(labels, logits.shape[2], ignore_index)
    w = _row_weight(labels, ignore_index, reduction, _acc_dtype(logits.dtype))
    row_loss, dlogits, lse = _backend.implementation("task_cross_entropy", backend).forward(
        logits, labels, w, label_smoothing, ignore_index)
    loss = row_loss if reduction == "none" else row_loss.sum(1)
    return loss, dlogits, lse


@_tce_op.register_fake
def _(logits, labels, label_smoothing, ignore_index, reduction, backend):
    T, N, C = logits.shape
    acc = _acc_dtype(logits.dtype)
    loss = logits.new_empty((T, N) if reduction == "none" else (T,), dtype=acc)
    return loss, logits.new_empty((T, N, C)), logits.new_empty((T, N), dtype=acc)


def _tce_setup_context(ctx, inputs, output):
    logits, labels, _, ignore_index, reduction, backend = inputs
    _, dlogits, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # an unused dlogits output must not cost a JVP of zeros
    # dlogits is saved as an output: differentiating the backward (g * dlogits) routes back into
    # this node with a gradient for dlogits, i.e. into the softmax JVP below.
    ctx.save_for_backward(logits, labels, dlogits, lse)
    ctx.ignore_index, ctx.reduction, ctx.backend = ignore_index, reduction, backend


def _tce_backward(ctx, g_loss, g_dlogits, g_lse):
    logits, labels, dlogits, lse = ctx.saved_tensors
    grad = None
    if g_loss is not None:
        g = g_loss.unsqueeze(-1) if ctx.reduction == "none" else g_loss.view(-1, 1, 1)
        grad = dlogits * g.to(dlogits.dtype)
    if g_dlogits is not None:
        w = _row_weight(labels, ctx.ignore_index, ctx.reduction, lse.dtype)
        jvp = _jvp_op(logits, lse, g_dlogits, w, ctx.backend)
        grad = jvp if grad is None else grad + jvp
    return grad, None, None, None, None, None


_tce_op.register_autograd(_tce_backward, setup_context=_tce_setup_context)


@torch.library.custom_op("metafast::task_cross_entropy_softmax_jvp", mutates_args=())
def _jvp_op(logits: Tensor, lse: Tensor, v: Tensor, row_scale: Tensor, backend: str) -> Tensor:
    """row_scale * p * (v - <p, v>) per row, p = exp(logits - lse): the derivative of
    dlogits = w * (softmax - target) applied to v (row_scale = w). lse must be the logsumexp of
    logits; its gradient is folded into the one for logits."""
    return _backend.implementation("task_cross_entropy", backend).softmax_jvp(logits, lse, v, row_scale)


@_jvp_op.register_fake
def _(logits, lse, v, row_scale, backend):
    return logits.new_empty(logits.shape)


def _jvp_setup_context(ctx, inputs, output):
    logits, lse, v, row_scale, backend = inputs
    ctx.save_for_backward(logits, lse, v, row_scale)
    ctx.backend = backend


def _jvp_backward(ctx, u):
    # out = s p (v - <p,v>) =: s p a. Only third-order derivatives of the loss get here, so the
    # logits/scale parts are plain (differentiable) PyTorch:
    #   d/dv = s p (u - <p,u>)                                   (the JVP itself: J is symmetric)
    #   d/dx = s p (u a - <u, p a> - a <u, p>)     d/ds = <u, p a>
    logits, lse, v, s = ctx.saved_tensors
    g_x = g_v = g_s = None
    if ctx.needs_input_grad[2]:
        g_v = _jvp_op(logits, lse, u, s, ctx.backend)
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[3]:
        acc = lse.dtype
        p = torch.softmax(logits.to(acc), dim=-1)
        u_, v_ = u.to(acc), v.to(acc)
        a = v_ - (p * v_).sum(-1, keepdim=True)
        upa = (u_ * p * a).sum(-1, keepdim=True)
        if ctx.needs_input_grad[0]:
            s_ = s.unsqueeze(-1)
            g_x = (s_ * p * (u_ * a - upa - a * (u_ * p).sum(-1, keepdim=True))).to(logits.dtype)
        if ctx.needs_input_grad[3]:
            g_s = upa.squeeze(-1)
    return g_x, None, g_v, g_s, None


_jvp_op.register_autograd(_jvp_backward, setup_context=_jvp_setup_context)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def task_cross_entropy(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0,
                       ignore_index: int = -100, reduction: str = "mean", *,
                       backend: Optional[str] = None) -> Tensor:
    """Per-task cross-entropy: logits [T, N, C], labels [T, N] int64 -> loss [T] ([T, N] for
    reduction="none"). See the module docstring for semantics, dtypes and backends."""
    _check_args(logits, labels, label_smoothing, ignore_index, reduction)
    backend = _backend.resolve("task_cross_entropy", logits, backend)
    if backend == "torch":  # the reference under plain autograd: the CPU path
        return task_cross_entropy_reference(logits, labels, label_smoothing, ignore_index, reduction)
    return _tce_op(logits, labels, float(label_smoothing), ignore_index, reduction, backend)[0]


def task_cross_entropy_with_grad(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0,
                                 ignore_index: int = -100, reduction: str = "mean", *,
                                 backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """(loss, dlogits) with dlogits = d sum(loss) / d logits [T, N, C], itself differentiable
    w.r.t. logits (the fused softmax JVP on GPU), so the inner gradient of a MAML step can be formed
    by hand and still be differentiated for the meta-gradient."""
    _check_args(logits, labels, label_smoothing, ignore_index, reduction)
    backend = _backend.resolve("task_cross_entropy", logits, backend)
    if backend == "torch":  # the reference under plain autograd: the CPU path
        return task_cross_entropy_reference_with_grad(logits, labels, label_smoothing, ignore_index,
                                                      reduction)
    loss, dlogits, _ = _tce_op(logits, labels, float(label_smoothing), ignore_index, reduction,
                               backend)
    return loss, dlogits
