"""Knowledge-distillation loss (Hinton et al. 2015) fused with its gradient.

``kd_loss(student_logits, teacher_logits, target=None, temperature=4.0, alpha=0.9, reduction="mean")``

Semantics (per row; s = student logits, t = teacher logits, T = temperature, y = target class)
- ``loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)``.
  The T^2 factor keeps the soft-target gradient's scale independent of T.
- ``target=None`` drops the CE term; alpha then weights the KD term alone:
  ``loss = alpha * T^2 * KL`` (alpha=1 is pure distillation).
- Shapes: logits ``[B, C]`` with target ``[B]``, or per-task ``[T, N, C]`` with target ``[T, N]``.
  ``"mean"`` averages over rows: a scalar for ``[B, C]``, one loss per task ``[T]`` for ``[T, N, C]``
  (so it can be BatchedMAML's inner loss through a callable); ``"sum"`` sums the same way;
  ``"none"`` gives ``[B]`` / ``[T, N]``. "mean" of KL over rows is PyTorch's ``kl_div(...,
  reduction="batchmean")``, the mathematically correct KL mean.
- The teacher is a constant: no gradient flows to ``teacher_logits`` (it is detached), on every
  backend. Student and teacher must have the same shape and dtype.
- Dtypes: float16/bfloat16/float32/float64. Accumulation is float32 (float64 for float64 logits);
  the loss comes back in float32 for half logits, else in the logits dtype; the gradient w.r.t. the
  student is in the student dtype.
- Labels are checked to lie in ``[0, C)``: always on CPU; on CUDA with one host sync, skipped while
  a CUDA graph is being captured and when ``METAFAST_CHECK_LABELS=0`` (an unchecked bad label gives
  that row NaN, never an out-of-bounds read).
- Differentiable twice w.r.t. the student (any number of times on the torch path).

Backends (``backend=`` keyword, else metafast._backend's choice)
- ``"torch"``: :func:`kd_loss_reference` (log_softmax + cross_entropy, plain autograd; the
  teacher's side computed once without a graph). This is the CPU path.
- ``"triton"`` / ``"cuda"``: the custom op ``metafast::kd_loss`` (-> loss, dstudent) calling the
  Triton kernel (kernels/kd_loss.py) or the CUDA extension (``metafast::kd_loss_fwd_cuda``,
  csrc/kd_loss.cu). One launch yields the loss and d(loss)/d(student), reading each row once while
  it fits one chunk of classes and twice beyond (online softmaxes, then KL and gradient); nothing
  else is saved. Backward scales the saved gradient; its own derivative is the softmax
  Jacobian-vector product written in differentiable PyTorch, so second-order use is exact.
"""
import math
import numbers
import os
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .. import _backend

__all__ = ["kd_loss", "kd_loss_reference", "KDLoss", "check_args"]

REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NO_IGNORE = -(2**63)  # cross_entropy's ignore_index that no label can hit: -100 is an error here too


# --------------------------------------------------------------------------------------------
# Checks and small helpers
# --------------------------------------------------------------------------------------------
def check_args(student, teacher, target, temperature, alpha, reduction) -> None:
    """Validate the arguments of :func:`kd_loss` (errors name the argument)."""
    where = "kd_loss"
    if not isinstance(student, Tensor):
        raise TypeError(f"{where}: student_logits must be a Tensor [B, C] or [T, N, C], "
                        f"got {type(student).__name__}")
    if not isinstance(teacher, Tensor):
        raise TypeError(f"{where}: teacher_logits must be a Tensor shaped like student_logits, "
                        f"got {type(teacher).__name__}")
    if student.dim() not in (2, 3):
        raise ValueError(f"{where}: student_logits must be 2-D [B, C] or 3-D [T, N, C], "
                         f"got shape {tuple(student.shape)}")
    if student.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{where}: student_logits must be float16, bfloat16, float32 or float64, "
                        f"got {student.dtype}")
    if student.shape[-1] < 1:
        raise ValueError(f"{where}: student_logits must have at least one class (C >= 1), got shape "
                         f"{tuple(student.shape)}")
    if tuple(teacher.shape) != tuple(student.shape):
        raise ValueError(f"{where}: teacher_logits must have the shape of student_logits "
                         f"{tuple(student.shape)}, got {tuple(teacher.shape)}")
    if teacher.dtype != student.dtype:
        raise TypeError(f"{where}: teacher_logits must have the dtype of student_logits "
                        f"({student.dtype}), got {teacher.dtype}")
    if teacher.device != student.device:
        raise ValueError(f"{where}: teacher_logits must be on student_logits' device {student.device}, "
                         f"got {teacher.device}")
    if target is not None:
        if not isinstance(target, Tensor):
            raise TypeError(f"{where}: target must be an int64 Tensor or None, got {type(target).__name__}")
        if target.dtype != torch.int64:
            raise TypeError(f"{where}: target must have dtype torch.int64, got {target.dtype}")
        if tuple(target.shape) != tuple(student.shape[:-1]):
            raise ValueError(f"{where}: target must have shape {tuple(student.shape[:-1])} to match "
                             f"student_logits {tuple(student.shape)}, got {tuple(target.shape)}")
        if target.device != student.device:
            raise ValueError(f"{where}: target must be on student_logits' device {student.device}, "
                             f"got {target.device}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not (math.isfinite(float(temperature)) and float(temperature) > 0):
        raise ValueError(f"{where}: temperature must be a finite float > 0, got {temperature!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"{where}: alpha must be a float in [0, 1], got {alpha!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{where}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_label_range(target: Optional[Tensor], num_classes: int, force: bool = False) -> None:
    if target is None:
        return
    if target.is_cuda and not force:
        if os.environ.get("METAFAST_CHECK_LABELS", "1") == "0":
            return
        if torch.cuda.is_current_stream_capturing():
            return  # a host sync would break graph capture; the kernels yield NaN instead
    if target.device.type == "meta":  # shapes only: no values to check
        return
    bad = (target < 0) | (target >= num_classes)
    if bool(bad.any()):
        first = target[bad][0].item()
        raise ValueError(f"kd_loss: target must hold class ids in [0, {num_classes}), got {first}")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _coefficients(temperature: float, alpha: float, has_target: bool, rows: int, reduction: str):
    """(1/T, c_kl, c_kd, c_ce): loss = c_kl KL + c_ce CE, dloss/ds = c_kd (p - r) + c_ce (q - onehot),
    with the "mean" weight 1/rows folded in."""
    w = 1.0 / max(rows, 1) if reduction == "mean" else 1.0
    ce = (1.0 - alpha) if has_target else 0.0
    return 1.0 / temperature, w * alpha * temperature * temperature, w * alpha * temperature, w * ce


# --------------------------------------------------------------------------------------------
# Pure-PyTorch reference: test oracle, CPU kernel, benchmark baseline
# --------------------------------------------------------------------------------------------
def _reference_rows(student: Tensor, teacher: Tensor, target: Optional[Tensor], temperature: float,
                    alpha: float) -> Tensor:
    acc = _acc_dtype(student.dtype)
    s = student if student.dtype == acc else student.to(acc)
    t = teacher.detach()
    t = t if t.dtype == acc else t.to(acc)
    inv_t = 1.0 / temperature
    log_p = torch.log_softmax(s * inv_t, dim=-1)
    c_kl = alpha * temperature * temperature
    with torch.no_grad():  # the teacher side is a constant: no graph, and its entropy term once
        log_r = torch.log_softmax(t * inv_t, dim=-1)
        r = log_r.exp()
        neg_entropy = (r * log_r).sum(-1)
        # classes the teacher rules out (r = 0, log r = -inf) add 0; compiled: always (no host sync)
        if torch.compiler.is_compiling() or neg_entropy.device.type == "meta" or neg_entropy.isnan().any():
            neg_entropy = torch.where(r > 0, r * log_r, 0.0).sum(-1)
    rows = (neg_entropy - (r * log_p).sum(-1)) * c_kl
    if target is not None:
        try:
            ce = torch.nn.functional.cross_entropy(s.reshape(-1, s.shape[-1]), target.reshape(-1),
                                                   reduction="none", ignore_index=_NO_IGNORE).view(target.shape)
        except (IndexError, RuntimeError):
            _check_label_range(target, s.shape[-1], force=True)  # names the bad label
            raise
        rows = rows + (1.0 - alpha) * ce
    return rows


def _reduce(rows: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum(-1)
    return rows.mean(-1) if rows.shape[-1] > 0 else rows.sum(-1)  # an empty task: 0, not NaN


def kd_loss_reference(student_logits: Tensor, teacher_logits: Tensor, target: Optional[Tensor] = None,
                      temperature: float = 4.0, alpha: float = 0.9, reduction: str = "mean") -> Tensor:
    """KD loss with log_softmax + cross_entropy in plain PyTorch (differentiable any number
    of times w.r.t. the student). Same semantics and dtypes as :func:`kd_loss`."""
    check_args(student_logits, teacher_logits, target, temperature, alpha, reduction)
    if target is not None and target.is_cuda:
        _check_label_range(target, student_logits.shape[-1])
    # CPU: cross_entropy rejects a bad label itself; _reference_rows turns that into a clear error
    rows = _reference_rows(student_logits, teacher_logits, target, float(temperature), float(alpha))
    return _reduce(rows, reduction)


# --------------------------------------------------------------------------------------------
# Custom op (CUDA extension or Triton)
# --------------------------------------------------------------------------------------------
_backend.register("kd_loss", "cuda", forward=lambda *a: torch.ops.metafast.kd_loss_fwd_cuda(*a))
_backend.register("kd_loss", "triton", forward="metafast.kernels.kd_loss:kd_loss_fwd")  # imported on first use
_backend.register("kd_loss", "torch", reference=kd_loss_reference)  # runs under plain autograd, not the custom op


@torch.library.custom_op("metafast::kd_loss", mutates_args=())
def _kd_op(student: Tensor, teacher: Tensor, target: Optional[Tensor], temperature: float, alpha: float,
           reduction: str, backend: str) -> Tuple[Tensor, Tensor]:
    """[T, N, C] logits -> (loss [T] or [T, N] for "none", dstudent [T, N, C] = d sum(loss) / d student)."""
    _check_label_range(target, student.shape[2])
    coefs = _coefficients(temperature, alpha, target is not None, student.shape[1], reduction)
    row_loss, grad = _backend.implementation("kd_loss", backend).forward(student, teacher, target, *coefs)
    loss = row_loss if reduction == "none" else row_loss.sum(1)
    return loss, grad


@_kd_op.register_fake
def _(student, teacher, target, temperature, alpha, reduction, backend):
    T, N, C = student.shape
    acc = _acc_dtype(student.dtype)
    loss = student.new_empty((T, N) if reduction == "none" else (T,), dtype=acc)
    return loss, student.new_empty((T, N, C))


def _kd_setup_context(ctx, inputs, output):
    student, _, target, temperature, alpha, reduction, _ = inputs
    _, grad = output
    ctx.mark_non_differentiable(grad)  # never handed out: only the backward reads it
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(student, grad)
    ctx.coefs = _coefficients(temperature, alpha, target is not None, student.shape[1], reduction)
    ctx.reduction = reduction


def _kd_backward(ctx, g_loss, _g_grad):
    if g_loss is None:
        return None, None, None, None, None, None, None
    student, grad = ctx.saved_tensors
    g = g_loss.unsqueeze(-1) if ctx.reduction == "none" else g_loss.view(-1, 1, 1)
    return _ScaleGrad.apply(student, grad, g, ctx.coefs), None, None, None, None, None, None


_kd_op.register_autograd(_kd_backward, setup_context=_kd_setup_context)


def _softmax_jvp(student: Tensor, v: Tensor, coefs) -> Tensor:
    """d(dloss/ds)/ds applied to v, in differentiable PyTorch. With p = softmax(s/T), q = softmax(s),
    J(p) v = p * (v - <p, v>) (symmetric):  c_kd/T * J(p) v + c_ce * J(q) v."""
    inv_t, _, c_kd, c_ce = coefs
    acc = _acc_dtype(student.dtype)
    s, v = student.to(acc), v.to(acc)
    p = torch.softmax(s * inv_t, dim=-1)
    out = (c_kd * inv_t) * p * (v - (p * v).sum(-1, keepdim=True))
    if c_ce != 0.0:
        q = torch.softmax(s, dim=-1)
        out = out + c_ce * q * (v - (q * v).sum(-1, keepdim=True))
    return out.to(student.dtype)


class _ScaleGrad(torch.autograd.Function):
    """g * grad, where grad = dloss/ds was saved by the fused forward. Differentiating it w.r.t. the
    student is the softmax JVP (exact second order); w.r.t. g it is grad itself."""

    @staticmethod
    def forward(ctx, student, grad, g, coefs):
        ctx.save_for_backward(student, grad, g)
        ctx.coefs = coefs
        return grad * g.to(grad.dtype)

    @staticmethod
    def backward(ctx, u):
        student, grad, g = ctx.saved_tensors
        d_student = d_g = None
        if ctx.needs_input_grad[0]:
            d_student = _softmax_jvp(student, u * g.to(u.dtype), ctx.coefs)
        if ctx.needs_input_grad[2]:
            d_g = (u * grad).to(g.dtype).sum(-1, keepdim=True)
            if g.shape[1] == 1:
                d_g = d_g.sum(1, keepdim=True)
        return d_student, None, d_g, None


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def kd_loss(student_logits: Tensor, teacher_logits: Tensor, target: Optional[Tensor] = None,
            temperature: float = 4.0, alpha: float = 0.9, reduction: str = "mean", *,
            backend: Optional[str] = None) -> Tensor:
    """alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, target).

    Logits [B, C] (target [B]) or [T, N, C] (target [T, N]); target=None drops the CE term and alpha
    then scales the KD term alone. See the module docstring for reductions, dtypes and backends."""
    check_args(student_logits, teacher_logits, target, temperature, alpha, reduction)
    backend = _backend.resolve("kd_loss", student_logits, backend)
    if backend == "torch":  # the reference under plain autograd: the CPU path
        return kd_loss_reference(student_logits, teacher_logits, target, temperature, alpha, reduction)
    flat = student_logits.dim() == 2
    s = student_logits.unsqueeze(0) if flat else student_logits
    t = teacher_logits.detach()
    t = t.unsqueeze(0) if flat else t
    y = None if target is None else (target.unsqueeze(0) if flat else target)
    loss = _kd_op(s, t, y, float(temperature), float(alpha), reduction, backend)[0]
    return loss[0] if flat else loss


class KDLoss(nn.Module):
    """Module form of :func:`kd_loss`: ``KDLoss(temperature, alpha, reduction)(student, teacher, target)``."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, reduction: str = "mean",
                 backend: Optional[str] = None):
        super().__init__()
        # validate once here, with placeholder logits, so a bad setting fails at construction
        dummy = torch.zeros(1, 1)
        check_args(dummy, dummy, None, temperature, alpha, reduction)
        self.temperature, self.alpha, self.reduction, self.backend = float(temperature), float(alpha), reduction, backend

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Optional[Tensor] = None) -> Tensor:
        return kd_loss(student_logits, teacher_logits, target, self.temperature, self.alpha, self.reduction,
                       backend=self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}, reduction={self.reduction!r}"
