"""Triton kernels of ``inner_update`` and their launchers (no autograd: metafast/ops/inner_update.py
owns the op, its checks and its derivatives).

    fast[t, p] = theta[p or t, p] - lr[p or scalar] * scale[t] * grad[t, p]
    scale[t]   = min(1, c[t]),  c[t] = max_norm / (n[t] + 1e-6),  n[t] = ||grad[t, :]||_2
                 (1 without clipping: torch.nn.utils.clip_grad_norm_ applied to each task row)

Forward: [clip] per-task partial sums of grad^2 -> update (each program finishes its task's sum).
Backward: [clip] partial sums of grad^2 and grad_out*lr*grad -> per-task coefficients -> one pass
over p that loops over the tasks (column sums over t stay in registers).

Accumulation is float32 (float64 for float64 inputs). Program ids are int64. Python floats reach a
kernel as float32, so lr and max_norm travel as (hi, lo) float32 pairs whose sum keeps ~48 bits.
All launchers run under TRITON_INTERPRET=1 on CPU tensors as well.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import acc_dtypes, split_f64

CLIP_EPS: tl.constexpr = tl.constexpr(1e-6)  # jit code may only read constexpr globals
BLOCK = 1024         # elements per program along P
MAX_GRID_Y = 65535   # tasks go on grid axis 1
MAX_PARTS = 64       # partial sums per task for the clip norm (the consumers reduce them)

# lr modes (constexpr LR_MODE)
LR_VALUE = 0         # a host scalar (lr_hi + lr_lo)
LR_SCALAR_PTR = 1    # a 0-d tensor
LR_PER_ELEM = 2      # a [P] tensor (Meta-SGD)


# partial_sumsq[t, b] = sum_{p in slice b} grad[t, p]^2
# partial_dot[t, b]   = sum_{p in slice b} grad_out[t, p] * lr[p] * grad[t, p]      (WITH_DOT)
# Slice b of a row is the blocks b, b + NPARTS, b + 2 NPARTS, ... of BLOCK elements.
@triton.jit
def _row_partials_kernel(
    grad_ptr,       # [T, P] gradient
    gout_ptr,       # [T, P] upstream gradient (read when WITH_DOT)
    lr_ptr,         # [P] or [] learning rate (read when LR_MODE > 0)
    sumsq_ptr,      # [T, NPARTS] out: partial sums of grad^2
    dot_ptr,        # [T, NPARTS] out: partial sums of grad_out * lr * grad (WITH_DOT)
    stride_g,       # row stride of grad
    stride_go,      # row stride of grad_out
    P,              # row length
    lr_hi, lr_lo,   # learning rate when LR_MODE == LR_VALUE
    NPARTS: tl.constexpr,    # slices per row (the grid's axis 0)
    BLOCK: tl.constexpr,     # elements per step
    LR_MODE: tl.constexpr,   # LR_VALUE / LR_SCALAR_PTR / LR_PER_ELEM
    WITH_DOT: tl.constexpr,  # also the grad_out * lr * grad sums
    ACC: tl.constexpr,       # accumulation dtype
):
    part = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    acc_ss = tl.zeros([BLOCK], dtype=ACC)
    acc_dot = tl.zeros([BLOCK], dtype=ACC)
    for start in range(part * BLOCK, P, NPARTS * BLOCK):
        idx = start + offs
        mask = idx < P
        g = tl.load(grad_ptr + t * stride_g + idx, mask=mask, other=0.0).to(ACC)
        acc_ss += g * g
        if WITH_DOT:
            go = tl.load(gout_ptr + t * stride_go + idx, mask=mask, other=0.0).to(ACC)
            if LR_MODE == 2:
                go = go * tl.load(lr_ptr + idx, mask=mask, other=0.0).to(ACC)
            acc_dot += go * g
    tl.store(sumsq_ptr + t * NPARTS + part, tl.sum(acc_ss, axis=0))
    if WITH_DOT:
        dot = tl.sum(acc_dot, axis=0)
        if LR_MODE == 0:
            dot = dot * (tl.cast(lr_hi, ACC) + tl.cast(lr_lo, ACC))
        if LR_MODE == 1:
            dot = dot * tl.load(lr_ptr).to(ACC)
        tl.store(dot_ptr + t * NPARTS + part, dot)


# fast[t, p] = theta[t * stride_th + p] - lr[p] * (scale[t] * grad[t, p])
# scale[t]   = min(1, max_norm / (sqrt(sum_b sumsq[t, b]) + 1e-6))   (CLIP), else 1
@triton.jit
def _inner_update_fwd_kernel(
    theta_ptr,      # [P] or [T, P] start point
    grad_ptr,       # [T, P] gradient
    lr_ptr,         # [P] or [] learning rate (read when LR_MODE > 0)
    sumsq_ptr,      # [T, NPARTS] partial sums of grad^2 (read when CLIP)
    out_ptr,        # [T, P] out: fast weights
    stride_th,      # row stride of theta (0: broadcast over tasks)
    stride_g,       # row stride of grad
    stride_o,       # row stride of out
    P,              # row length
    lr_hi, lr_lo,   # learning rate when LR_MODE == LR_VALUE
    mn_hi, mn_lo,   # max_norm (CLIP)
    NPARTS: tl.constexpr,       # partial sums per task
    NPARTS_POW2: tl.constexpr,  # NPARTS rounded up to a power of two
    BLOCK: tl.constexpr,        # elements per program
    LR_MODE: tl.constexpr,      # LR_VALUE / LR_SCALAR_PTR / LR_PER_ELEM
    CLIP: tl.constexpr,         # per-task gradient-norm clipping
    ACC: tl.constexpr,          # accumulation dtype
):
    pid = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < P
    g = tl.load(grad_ptr + t * stride_g + idx, mask=mask, other=0.0).to(ACC)
    if CLIP:
        parts = tl.arange(0, NPARTS_POW2)
        ss = tl.sum(tl.load(sumsq_ptr + t * NPARTS + parts, mask=parts < NPARTS, other=0.0), axis=0)
        coef = (tl.cast(mn_hi, ACC) + tl.cast(mn_lo, ACC)) / (tl.sqrt(ss) + CLIP_EPS)
        g = g * tl.minimum(coef, 1.0)
    if LR_MODE == 0:
        step = (tl.cast(lr_hi, ACC) + tl.cast(lr_lo, ACC)) * g
    elif LR_MODE == 1:
        step = tl.load(lr_ptr).to(ACC) * g
    else:
        step = tl.load(lr_ptr + idx, mask=mask, other=0.0).to(ACC) * g
    th = tl.load(theta_ptr + t * stride_th + idx, mask=mask, other=0.0).to(ACC)
    tl.store(out_ptr + t * stride_o + idx, (th - step).to(out_ptr.dtype.element_ty), mask=mask)


# Per-task coefficients of the backward (n = ||grad[t]||, s = sum_p grad_out*lr*grad, c = M/(n+eps)):
#   scale[t] = min(1, c)
#   kk[t]    = s * M / ((n + eps)^2 n)  when c <= 1 and n > 0, else 0
# (d scale / d grad = -M / (n + eps)^2 * grad / n where clipped; clamp passes the gradient at c == 1)
@triton.jit
def _clip_coeffs_kernel(
    sumsq_ptr,      # [T, NPARTS] partial sums of grad^2
    dot_ptr,        # [T, NPARTS] partial sums of grad_out * lr * grad
    scale_ptr,      # [T] out
    kk_ptr,         # [T] out
    T,              # number of tasks
    mn_hi, mn_lo,   # max_norm
    NPARTS: tl.constexpr,       # partial sums per task
    NPARTS_POW2: tl.constexpr,  # NPARTS rounded up to a power of two
    BLOCK_T: tl.constexpr,      # tasks per program
    ACC: tl.constexpr,          # accumulation dtype
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    parts = tl.arange(0, NPARTS_POW2)
    offs = rows[:, None] * NPARTS + parts[None, :]
    mask2 = (rows[:, None] < T) & (parts[None, :] < NPARTS)
    ss = tl.sum(tl.load(sumsq_ptr + offs, mask=mask2, other=0.0), axis=1)
    s = tl.sum(tl.load(dot_ptr + offs, mask=mask2, other=0.0), axis=1)
    max_norm = tl.cast(mn_hi, ACC) + tl.cast(mn_lo, ACC)
    n = tl.sqrt(ss)
    ne = n + CLIP_EPS
    c = max_norm / ne
    clipped = c <= 1.0
    n_safe = tl.where(n > 0, n, 1.0)
    kk = tl.where(clipped & (n > 0), s * max_norm / (ne * ne * n_safe), 0.0)
    mask = rows < T
    tl.store(scale_ptr + rows, tl.where(clipped, c, 1.0), mask=mask)
    tl.store(kk_ptr + rows, kk, mask=mask)


# d_grad[t, p] = -scale[t] * lr[p] * grad_out[t, p] + kk[t] * grad[t, p]      (NEED_DGRAD)
# d_theta[p]   = sum_t grad_out[t, p]                                       (NEED_DTHETA)
# d_lr[p]      = -sum_t scale[t] * grad_out[t, p] * grad[t, p]              (NEED_DLR, float ACC)
# scale = 1, kk = 0 without CLIP. One program owns BLOCK columns and loops over the T tasks.
@triton.jit
def _inner_update_bwd_kernel(
    gout_ptr,       # [T, P] upstream gradient
    grad_ptr,       # [T, P] gradient (read when NEED_DLR or CLIP)
    lr_ptr,         # [P] or [] learning rate (read when LR_MODE > 0)
    scale_ptr,      # [T] clip scale (CLIP)
    kk_ptr,         # [T] clip coefficient of grad (CLIP)
    dgrad_ptr,      # [T, P] out (NEED_DGRAD)
    dtheta_ptr,     # [P] out (NEED_DTHETA)
    dlr_ptr,        # [P] out, ACC dtype (NEED_DLR)
    stride_go,      # row stride of grad_out
    stride_g,       # row stride of grad
    stride_dg,      # row stride of d_grad
    T, P,           # sizes
    lr_hi, lr_lo,   # learning rate when LR_MODE == LR_VALUE
    BLOCK: tl.constexpr,        # columns per program
    LR_MODE: tl.constexpr,      # LR_VALUE / LR_SCALAR_PTR / LR_PER_ELEM
    CLIP: tl.constexpr,         # per-task gradient-norm clipping
    NEED_DGRAD: tl.constexpr,
    NEED_DTHETA: tl.constexpr,
    NEED_DLR: tl.constexpr,
    ACC: tl.constexpr,          # accumulation dtype
):
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < P
    if LR_MODE == 0:
        lr = tl.zeros([BLOCK], dtype=ACC) + (tl.cast(lr_hi, ACC) + tl.cast(lr_lo, ACC))
    elif LR_MODE == 1:
        lr = tl.zeros([BLOCK], dtype=ACC) + tl.load(lr_ptr).to(ACC)
    else:
        lr = tl.load(lr_ptr + idx, mask=mask, other=0.0).to(ACC)
    sum_go = tl.zeros([BLOCK], dtype=ACC)
    sum_lr = tl.zeros([BLOCK], dtype=ACC)
    # Row pointers advance by their strides (pointer arithmetic is 64-bit).
    go_ptrs = gout_ptr + idx
    g_ptrs = grad_ptr + idx
    dg_ptrs = dgrad_ptr + idx
    for t in range(0, T):
        go = tl.load(go_ptrs, mask=mask, other=0.0).to(ACC)
        if CLIP:
            scale = tl.load(scale_ptr + t)
        else:
            scale = 1.0
        if NEED_DLR or CLIP:
            g = tl.load(g_ptrs, mask=mask, other=0.0).to(ACC)
        if NEED_DGRAD:
            dg = -scale * lr * go
            if CLIP:
                dg += tl.load(kk_ptr + t) * g
            tl.store(dg_ptrs, dg.to(dgrad_ptr.dtype.element_ty), mask=mask)
        if NEED_DTHETA:
            sum_go += go
        if NEED_DLR:
            sum_lr -= scale * go * g
        go_ptrs += stride_go
        g_ptrs += stride_g
        dg_ptrs += stride_dg
    if NEED_DTHETA:
        tl.store(dtheta_ptr + idx, sum_go.to(dtheta_ptr.dtype.element_ty), mask=mask)
    if NEED_DLR:
        tl.store(dlr_ptr + idx, sum_lr, mask=mask)


# ----------------------------------------------------------------------------------- launchers
def _lr_args(lr: Optional[torch.Tensor], lr_scalar: float):
    """(lr pointer argument, LR_MODE, hi, lo)."""
    if lr is None:
        hi, lo = split_f64(lr_scalar)
        return None, LR_VALUE, hi, lo
    return lr, (LR_SCALAR_PTR if lr.dim() == 0 else LR_PER_ELEM), 0.0, 0.0


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x with unit stride along P (rows may be strided)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _nparts(T: int, P: int) -> int:
    # enough programs to fill a GPU for few tasks, at most MAX_PARTS so the consumers' sums stay cheap
    return max(1, min(triton.cdiv(P, BLOCK), triton.cdiv(1024, max(T, 1)), MAX_PARTS))


def _task_slices(T: int):
    for t0 in range(0, T, MAX_GRID_Y):
        yield t0, min(T, t0 + MAX_GRID_Y)


def _row_partials(grad, gout, lr_arg, lr_mode, lr_hi, lr_lo, nparts, acc):
    T, P = grad.shape
    sumsq = torch.empty((T, nparts), dtype=acc_dtypes(grad.dtype)[0], device=grad.device)
    dot = torch.empty_like(sumsq) if gout is not None else sumsq
    for t0, t1 in _task_slices(T):
        g = grad[t0:t1]
        go = gout[t0:t1] if gout is not None else g
        _row_partials_kernel[(nparts, t1 - t0)](
            g, go, lr_arg if lr_arg is not None else g, sumsq[t0:t1], dot[t0:t1],
            g.stride(0), go.stride(0), P, lr_hi, lr_lo,
            NPARTS=nparts, BLOCK=BLOCK, LR_MODE=lr_mode, WITH_DOT=gout is not None, ACC=acc)
    return sumsq, dot


def inner_update_fwd(theta: torch.Tensor, grad: torch.Tensor, lr: Optional[torch.Tensor], lr_scalar: float,
                     max_norm: Optional[float]) -> torch.Tensor:
    """fast [T, P]. theta [P] or [T, P], grad [T, P], lr None (use lr_scalar) / 0-d / [P]; the caller
    has checked shapes, dtypes and devices."""
    theta, grad = _rows(theta), _rows(grad)
    lr = lr.contiguous() if lr is not None else None
    T, P = grad.shape
    out = torch.empty((T, P), dtype=grad.dtype, device=grad.device)
    if out.numel() == 0:
        return out
    acc = acc_dtypes(grad.dtype)[1]
    lr_arg, lr_mode, lr_hi, lr_lo = _lr_args(lr, lr_scalar)
    clip = max_norm is not None
    nparts = _nparts(T, P) if clip else 1
    sumsq = _row_partials(grad, None, lr_arg, lr_mode, lr_hi, lr_lo, nparts, acc)[0] if clip else grad
    mn_hi, mn_lo = split_f64(max_norm) if clip else (1.0, 0.0)
    stride_th = 0 if theta.dim() == 1 else theta.stride(0)
    for t0, t1 in _task_slices(T):
        th = theta if theta.dim() == 1 else theta[t0:t1]
        _inner_update_fwd_kernel[(triton.cdiv(P, BLOCK), t1 - t0)](
            th, grad[t0:t1], lr_arg if lr_arg is not None else grad, sumsq[t0:t1] if clip else grad, out[t0:t1],
            stride_th, grad.stride(0), out.stride(0), P, lr_hi, lr_lo, mn_hi, mn_lo,
            NPARTS=nparts, NPARTS_POW2=triton.next_power_of_2(nparts), BLOCK=BLOCK, LR_MODE=lr_mode,
            CLIP=clip, ACC=acc)
    return out


def inner_update_bwd(grad_out: torch.Tensor, grad: torch.Tensor, lr: Optional[torch.Tensor], lr_scalar: float,
                     max_norm: Optional[float], need_grad: bool, need_theta: bool, need_lr: bool):
    """(d_grad [T, P], d_theta [P], d_lr shaped like lr); each is an empty tensor unless asked for."""
    grad_out, grad = _rows(grad_out), _rows(grad)
    lr = lr.contiguous() if lr is not None else None
    T, P = grad.shape
    # distinct empty tensors: outputs of a custom op may not alias each other
    d_grad = grad.new_empty((T, P) if need_grad else (0,))
    d_theta = grad.new_empty((P,) if need_theta else (0,))
    d_lr = grad.new_empty(0)
    if not (need_grad or need_theta or need_lr):
        return d_grad, d_theta, d_lr
    if T == 0 or P == 0:
        if need_theta:
            d_theta.zero_()
        return d_grad, d_theta, (torch.zeros_like(lr) if need_lr else d_lr)
    acc_torch, acc = acc_dtypes(grad.dtype)
    lr_arg, lr_mode, lr_hi, lr_lo = _lr_args(lr, lr_scalar)
    clip = max_norm is not None and (need_grad or need_lr)
    if clip:
        nparts = _nparts(T, P)
        sumsq, dot = _row_partials(grad, grad_out, lr_arg, lr_mode, lr_hi, lr_lo, nparts, acc)
        scale = torch.empty((T,), dtype=acc_torch, device=grad.device)
        kk = torch.empty_like(scale)
        mn_hi, mn_lo = split_f64(max_norm)
        block_t = 16
        _clip_coeffs_kernel[(triton.cdiv(T, block_t),)](
            sumsq, dot, scale, kk, T, mn_hi, mn_lo,
            NPARTS=nparts, NPARTS_POW2=triton.next_power_of_2(nparts), BLOCK_T=block_t, ACC=acc)
    else:
        scale = kk = grad
    d_lr_cols = torch.empty((P,), dtype=acc_torch, device=grad.device) if need_lr else grad
    _inner_update_bwd_kernel[(triton.cdiv(P, BLOCK),)](
        grad_out, grad, lr_arg if lr_arg is not None else grad, scale, kk,
        d_grad if need_grad else grad, d_theta if need_theta else grad, d_lr_cols,
        grad_out.stride(0), grad.stride(0), d_grad.stride(0) if need_grad else 0, T, P, lr_hi, lr_lo,
        BLOCK=BLOCK, LR_MODE=lr_mode, CLIP=clip, NEED_DGRAD=need_grad, NEED_DTHETA=need_theta,
        NEED_DLR=need_lr, ACC=acc)
    if need_lr:
        d_lr = (d_lr_cols.sum() if lr.dim() == 0 else d_lr_cols).to(grad.dtype)
    return d_grad, d_theta, d_lr
