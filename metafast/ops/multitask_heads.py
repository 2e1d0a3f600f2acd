"""Cross-entropy of H linear classification heads at once: one loss per head.

``multitask_heads_cross_entropy(features, weight, bias, labels)`` computes, for every head h,
``cross_entropy(features[h] @ weight[h].T + bias[h], labels[h])`` and returns the losses [H].
``features`` is [H, N, I] (each head sees its own rows) or [N, I] (one trunk output shared by all
heads); ``weight`` [H, O, I] stacks the heads' nn.Linear weights, ``bias`` [H, O] (or None), ``labels``
[H, N] int64 in [0, O). ``reduction`` is "mean" (over the N rows, as F.cross_entropy) or "sum".

Dtypes: features, weight and bias share one float dtype (float16/bfloat16/float32/float64);
accumulation is float32 (float64 for float64); the loss is float32 for half inputs, else the input
dtype. Labels are checked to lie in [0, O): always on CPU; on CUDA with one host sync, skipped while
a CUDA graph is being captured and when ``METAFAST_CHECK_LABELS=0`` (an unchecked bad label then
gives that head a NaN loss, never an out-of-bounds read).

Backends (``backend=`` keyword, else metafast._backend's choice)
- ``"torch"``: :func:`multitask_heads_cross_entropy_reference` (baddbmm + log_softmax, plain autograd).
  This is the CPU path and the float64 oracle.
- ``"triton"``: one kernel computes the heads' matmul (tl.dot), adds the bias and runs each row's
  softmax cross-entropy in registers, writing the row losses and dlogits; the logits never reach
  memory. Heads wider than 1024 classes use a batched matmul plus the task_cross_entropy kernel.
- ``"cuda"``: the logits come from cuBLAS (one batched GEMM, or one GEMM over all heads when the
  features are shared, bias folded in as the GEMM's C), then one kernel computes loss and dlogits
  reading each row once. The matmul is not fused with the softmax here: cuBLAS is faster at it than
  a hand-written GEMM would be.
Backward (both): dlogits scaled by the incoming gradient, then three batched matmuls through torch
(cuBLAS): d features = G @ W (one GEMM over all heads for shared features), d weight = G^T @ x,
d bias = sum_n G. Double backward: when the backward runs under create_graph it recomputes dlogits
with differentiable PyTorch ops, so second derivatives are exact.
"""
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _backend

__all__ = ["multitask_heads_cross_entropy", "multitask_heads_cross_entropy_reference", "heads_logits"]

REDUCTIONS = ("mean", "sum")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_WHERE = "multitask_heads_cross_entropy"


# --------------------------------------------------------------------------------------------
# Checks and small helpers
# --------------------------------------------------------------------------------------------
def _check_args(features, weight, bias, labels, reduction) -> None:
    for name, t in (("features", features), ("weight", weight), ("labels", labels)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{_WHERE}: {name} must be a Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"{_WHERE}: bias must be a Tensor [H, O] or None, got {type(bias).__name__}")
    if weight.dim() != 3:
        raise ValueError(f"{_WHERE}: weight must be a 3-D tensor [H, O, I] (stacked heads), got shape "
                         f"{tuple(weight.shape)}")
    H, O, I = weight.shape
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{_WHERE}: weight must be float16, bfloat16, float32 or float64, got {weight.dtype}")
    if O < 1:
        raise ValueError(f"{_WHERE}: weight must have at least one class (O >= 1), got shape {tuple(weight.shape)}")
    if features.dim() not in (2, 3):
        raise ValueError(f"{_WHERE}: features must be [H, N, I] or shared [N, I], got shape {tuple(features.shape)}")
    if features.shape[-1] != I:
        raise ValueError(f"{_WHERE}: features must have I = {I} in features (weight is {tuple(weight.shape)}), "
                         f"got shape {tuple(features.shape)}")
    if features.dim() == 3 and features.shape[0] != H:
        raise ValueError(f"{_WHERE}: features [H, N, I] must have H = {H} heads like weight, got shape "
                         f"{tuple(features.shape)}")
    N = features.shape[-2]
    if features.dtype != weight.dtype:
        raise TypeError(f"{_WHERE}: features must have weight's dtype {weight.dtype}, got {features.dtype}")
    if bias is not None:
        if tuple(bias.shape) != (H, O):
            raise ValueError(f"{_WHERE}: bias must have shape [H, O] = {(H, O)}, got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"{_WHERE}: bias must have weight's dtype {weight.dtype}, got {bias.dtype}")
    if labels.dtype != torch.int64:
        raise TypeError(f"{_WHERE}: labels must have dtype torch.int64, got {labels.dtype}")
    if tuple(labels.shape) != (H, N):
        raise ValueError(f"{_WHERE}: labels must have shape [H, N] = {(H, N)}, got {tuple(labels.shape)}")
    for name, t in (("features", features), ("bias", bias), ("labels", labels)):
        if t is not None and t.device != weight.device:
            raise ValueError(f"{_WHERE}: {name} must be on weight's device {weight.device}, got {t.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{_WHERE}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_label_range(labels: Tensor, num_classes: int) -> None:
    if labels.is_cuda:
        if os.environ.get("METAFAST_CHECK_LABELS", "1") == "0":
            return
        if torch.cuda.is_current_stream_capturing():
            return  # a host sync would break graph capture; the kernels yield NaN instead
    if labels.device.type == "meta":  # shapes only: no values to check
        return
    bad = (labels < 0) | (labels >= num_classes)
    if torch.compiler.is_compiling():  # no host sync inside a compiled graph: assert on the device
        torch._assert_async(~bad.any(), f"{_WHERE}: labels must be class ids in [0, {num_classes})")
        return
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(f"{_WHERE}: labels must be class ids in [0, {num_classes}), got {first}")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def heads_logits(features: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """[H, N, O] logits of every head: one batched GEMM (baddbmm) for [H, N, I] features; for shared
    [N, I] features one GEMM against all heads' classes at once ([N, H*O], returned as a view)."""
    if features.dim() == 2:
        H, O, I = weight.shape
        w = weight.reshape(H * O, I).t()
        out = features @ w if bias is None else torch.addmm(bias.reshape(H * O), features, w)
        return out.view(features.shape[0], H, O).permute(1, 0, 2)
    if bias is None:
        return torch.bmm(features, weight.transpose(1, 2))
    return torch.baddbmm(bias.unsqueeze(1), features, weight.transpose(1, 2))


# --------------------------------------------------------------------------------------------
# Pure-PyTorch reference: test oracle, CPU kernel, benchmark baseline
# --------------------------------------------------------------------------------------------
def _reference_dlogits(features, weight, bias, labels, reduction) -> Tensor:
    """Differentiable w * (softmax(z) - onehot(y)) in the accumulation dtype."""
    acc = _acc_dtype(weight.dtype)
    z = heads_logits(features.to(acc), weight.to(acc), None if bias is None else bias.to(acc))
    d = torch.softmax(z, -1) - torch.nn.functional.one_hot(labels, z.shape[-1]).to(acc)
    return d / labels.shape[1] if reduction == "mean" and labels.shape[1] > 0 else d


def multitask_heads_cross_entropy_reference(features: Tensor, weight: Tensor, bias: Optional[Tensor],
                                            labels: Tensor, reduction: str = "mean") -> Tensor:
    """Per-head cross-entropy with baddbmm + log_softmax + gather in plain PyTorch (differentiable any
    number of times). Same semantics and dtypes as :func:`multitask_heads_cross_entropy`."""
    _check_args(features, weight, bias, labels, reduction)
    _check_label_range(labels, weight.shape[1])
    acc = _acc_dtype(weight.dtype)
    z = heads_logits(features.to(acc), weight.to(acc), None if bias is None else bias.to(acc))
    nll = -torch.log_softmax(z, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    total = nll.sum(1)
    if reduction == "mean" and labels.shape[1] > 0:
        total = total / labels.shape[1]
    return total


# --------------------------------------------------------------------------------------------
# Custom op (CUDA extension or Triton)
# --------------------------------------------------------------------------------------------
_OP = "multitask_heads_cross_entropy"
_backend.register(_OP, "cuda", forward=lambda *a: torch.ops.metafast.multitask_heads_ce_fwd_cuda(*a))
_backend.register(_OP, "triton", forward="metafast.kernels.multitask_heads:multitask_heads_fwd")  # needs triton
_backend.register(_OP, "torch", reference=multitask_heads_cross_entropy_reference)  # plain autograd, not the custom op


@torch.library.custom_op("metafast::multitask_heads_cross_entropy", mutates_args=())
def _mth_op(features: Tensor, weight: Tensor, bias: Tensor, labels: Tensor, reduction: str,
            backend: str) -> Tuple[Tensor, Tensor]:
    """Returns (loss [H], dlogits [H, N, O] = d sum(loss) / d logits)."""
    _check_label_range(labels, weight.shape[1])
    mean = reduction == "mean"
    row_loss, dlogits = _backend.implementation(_OP, backend).forward(features, weight, bias, labels, mean)
    return row_loss.sum(1), dlogits


@_mth_op.register_fake
def _(features, weight, bias, labels, reduction, backend):
    H, O, _ = weight.shape
    N = labels.shape[1]
    return weight.new_empty((H,), dtype=_acc_dtype(weight.dtype)), weight.new_empty((H, N, O))


def _mth_setup_context(ctx, inputs, output):
    features, weight, bias, labels, reduction, backend = inputs
    _, dlogits = output
    ctx.mark_non_differentiable(dlogits)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(features, weight, bias, labels, dlogits)
    ctx.reduction = reduction


def _mth_backward(ctx, g_loss, _g_dlogits):
    features, weight, bias, labels, dlogits = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if g_loss is None or not (need_x or need_w or need_b):
        return None, None, None, None, None, None
    if torch.is_grad_enabled():
        # create_graph: rebuild dlogits from differentiable ops so the gradient can be differentiated
        d = _reference_dlogits(features, weight, bias, labels, ctx.reduction).to(weight.dtype)
    else:
        d = dlogits
    G = d * g_loss.to(d.dtype).view(-1, 1, 1)
    gx = gw = gb = None
    if features.dim() == 2:  # shared features: one GEMM each over all heads' classes
        H, O, I = weight.shape
        Gf = G.permute(1, 0, 2).reshape(-1, H * O)
        if need_x:
            gx = Gf @ weight.reshape(H * O, I)
        if need_w:
            gw = (Gf.t() @ features).view(H, O, I)
    else:
        if need_x:
            gx = torch.bmm(G, weight)
        if need_w:
            gw = torch.bmm(G.transpose(1, 2), features)
    if need_b:
        gb = G.sum(1)
    return gx, gw, gb, None, None, None


_mth_op.register_autograd(_mth_backward, setup_context=_mth_setup_context)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def multitask_heads_cross_entropy(features: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                                  reduction: str = "mean", *, backend: Optional[str] = None) -> Tensor:
    """Per-head cross-entropy of H stacked linear heads: features [H, N, I] or shared [N, I],
    weight [H, O, I], bias [H, O] or None, labels [H, N] int64 -> loss [H]. See the module docstring."""
    _check_args(features, weight, bias, labels, reduction)
    backend = _backend.resolve(_OP, weight, backend)
    if backend == "torch":  # the reference under plain autograd: the CPU path
        return multitask_heads_cross_entropy_reference(features, weight, bias, labels, reduction)
    if bias is None:
        bias = weight.new_zeros(weight.shape[:2])
    return _mth_op(features, weight, bias, labels, reduction, backend)[0]
