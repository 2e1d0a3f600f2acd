"""Triton kernels for ``task_cross_entropy``: per-row softmax cross-entropy fused with its gradient,
and the softmax Jacobian-vector product used by its double backward.

The rows of all tasks are flattened (row r = t * N + n). A program owns BLOCK_R rows and sweeps the
classes in chunks of BLOCK_C (online softmax), so registers stay bounded for any C (128K included);
when one chunk covers C the row is read from memory exactly once.

The launchers only allocate and launch: argument checking, row weights and autograd live in
``metafast.ops.task_cross_entropy``.
"""
import torch
import triton
import triton.language as tl

from ._common import NEG_BIG, acc_dtypes, online_softmax_update, row_tiles, split_f64

# Largest class chunk one program holds in registers (fp64 tiles cost twice the registers).
MAX_BLOCK_C = 4096
MAX_BLOCK_C_FP64 = 2048


# Math (one row x in R^C, label y, smoothing eps, row weight w):
#   target   q_c = (1 - eps) [c == y] + eps / C
#   lse      = log sum_c exp(x_c)                      (online: running max m, running sum s)
#   loss     = -sum_c q_c log softmax(x)_c = lse - (1 - eps) x_y - (eps / C) sum_c x_c
#   dloss/dx = softmax(x) - q
# Stored: row_loss = w * loss and dlogits = w * (softmax(x) - q), where w = 1 / n_valid(task) for
# "mean", 1 for "sum"/"none", 0 on ignored rows. A label outside [0, C) that is not ignore_index
# is never dereferenced: its row gets NaN loss and gradient.
@triton.jit
def _tce_fwd_kernel(
    logits_ptr,  # [T, N, C] logits, any strides
    labels_ptr,  # [T, N] int64 class ids, any strides
    weight_ptr,  # [T, N] contiguous, ACC_DTYPE: row weight w
    loss_ptr,  # [T, N] contiguous, ACC_DTYPE, out: w * loss
    dlogits_ptr,  # [T, N, C] contiguous, logits dtype, out: w * (softmax - q)
    lse_ptr,  # [T, N] contiguous, ACC_DTYPE, out: logsumexp of the row (saved for the JVP)
    stride_xt, stride_xn, stride_xc,  # logits strides
    stride_yt, stride_yn,  # labels strides
    R, N, C,  # rows (T * N), rows per task, classes
    ignore_index,  # label value whose row is skipped
    smoothing_hi,  # eps in [0, 1) as fp32 hi + lo parts: scalar args are fp32, and
    smoothing_lo,  #   float64 rows need eps to float64 precision
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_C: tl.constexpr,  # classes per chunk (power of two)
    SINGLE_CHUNK: tl.constexpr,  # BLOCK_C >= C: keep the row in registers, read it once
    HAS_SMOOTHING: tl.constexpr,  # eps > 0 (skips sum_c x_c, avoids 0 * inf)
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for float64 logits
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_mask = rows < R
    t = rows // N
    n = rows % N
    x_rows = logits_ptr + t * stride_xt + n * stride_xn
    label = tl.load(labels_ptr + t * stride_yt + n * stride_yn, mask=row_mask, other=ignore_index)
    valid = row_mask & (label != ignore_index)
    in_range = (label >= 0) & (label < C)
    w = tl.load(weight_ptr + rows, mask=row_mask, other=0.0).to(ACC_DTYPE)
    w = tl.where(valid & ~in_range, float("nan"), w)
    hit = valid & in_range
    x_y = tl.load(x_rows + tl.where(hit, label, 0) * stride_xc, mask=hit, other=0.0).to(ACC_DTYPE)
    eps = tl.cast(smoothing_hi, ACC_DTYPE) + tl.cast(smoothing_lo, ACC_DTYPE)
    cols = tl.arange(0, BLOCK_C)

    if SINGLE_CHUNK:
        mask = row_mask[:, None] & (cols[None, :] < C)
        x = tl.load(x_rows[:, None] + cols[None, :] * stride_xc, mask=mask, other=float("-inf"))
        x = x.to(ACC_DTYPE)
        m = tl.maximum(tl.max(x, 1), NEG_BIG)
        e = tl.exp(x - m[:, None])
        s = tl.sum(e, 1)
        sum_x = tl.sum(tl.where(mask, x, 0.0), 1)
    else:
        m = tl.full([BLOCK_R], NEG_BIG, ACC_DTYPE)
        s = tl.zeros([BLOCK_R], ACC_DTYPE)
        sum_x = tl.zeros([BLOCK_R], ACC_DTYPE)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + cols
            mask = row_mask[:, None] & (cc[None, :] < C)
            x = tl.load(x_rows[:, None] + cc[None, :] * stride_xc, mask=mask, other=float("-inf"))
            x = x.to(ACC_DTYPE)
            m, s = online_softmax_update(m, s, x)
            if HAS_SMOOTHING:
                sum_x += tl.sum(tl.where(mask, x, 0.0), 1)
    lse = m + tl.log(s)

    if HAS_SMOOTHING:
        loss = lse - (1.0 - eps) * x_y - (eps / C) * sum_x
    else:
        loss = lse - x_y
    tl.store(loss_ptr + rows, tl.where(valid, w * loss, 0.0), mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)

    w = tl.where(valid, w, 0.0)
    d_rows = dlogits_ptr + rows * C
    if SINGLE_CHUNK:
        q = tl.where(cols[None, :] == label[:, None], 1.0 - eps, 0.0) + eps / C
        d = w[:, None] * (e / s[:, None] - q)
        tl.store(d_rows[:, None] + cols[None, :], d.to(dlogits_ptr.dtype.element_ty), mask=mask)
    else:
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + cols
            mask = row_mask[:, None] & (cc[None, :] < C)
            x = tl.load(x_rows[:, None] + cc[None, :] * stride_xc, mask=mask, other=float("-inf"))
            p = tl.exp(x.to(ACC_DTYPE) - lse[:, None])
            q = tl.where(cc[None, :] == label[:, None], 1.0 - eps, 0.0) + eps / C
            d = w[:, None] * (p - q)
            tl.store(d_rows[:, None] + cc[None, :], d.to(dlogits_ptr.dtype.element_ty), mask=mask)


# Math: dlogits = w (p - q) with p = softmax(x), so d(dlogits)/dx = w (diag(p) - p p^T), symmetric;
# q (label, smoothing) is constant. For v in R^C and a row scale s (w times any upstream factor):
#   out = s * (diag(p) - p p^T) v = s * p * (v - <p, v>)
# p = exp(x - lse) reuses the forward's logsumexp. Rows with s == 0 (ignored) give 0.
@triton.jit
def _tce_softmax_jvp_kernel(
    logits_ptr,  # [T, N, C] logits, any strides
    lse_ptr,  # [T, N] contiguous, ACC_DTYPE: logsumexp from the forward
    v_ptr,  # [T, N, C] vector, any strides
    scale_ptr,  # [T, N] contiguous, ACC_DTYPE: row scale s
    out_ptr,  # [T, N, C] contiguous, logits dtype, out
    stride_xt, stride_xn, stride_xc,  # logits strides
    stride_vt, stride_vn, stride_vc,  # v strides
    R, N, C,  # rows (T * N), rows per task, classes
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_C: tl.constexpr,  # classes per chunk (power of two)
    SINGLE_CHUNK: tl.constexpr,  # BLOCK_C >= C: read x and v once
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for float64 logits
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_mask = rows < R
    t = rows // N
    n = rows % N
    x_rows = logits_ptr + t * stride_xt + n * stride_xn
    v_rows = v_ptr + t * stride_vt + n * stride_vn
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0).to(ACC_DTYPE)
    s = tl.load(scale_ptr + rows, mask=row_mask, other=0.0).to(ACC_DTYPE)
    cols = tl.arange(0, BLOCK_C)
    o_rows = out_ptr + rows * C

    if SINGLE_CHUNK:
        mask = row_mask[:, None] & (cols[None, :] < C)
        x = tl.load(x_rows[:, None] + cols[None, :] * stride_xc, mask=mask, other=float("-inf"))
        v = tl.load(v_rows[:, None] + cols[None, :] * stride_vc, mask=mask, other=0.0).to(ACC_DTYPE)
        p = tl.exp(x.to(ACC_DTYPE) - lse[:, None])
        dot = tl.sum(p * v, 1)
        o = s[:, None] * p * (v - dot[:, None])
        tl.store(o_rows[:, None] + cols[None, :], o.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        dot = tl.zeros([BLOCK_R], ACC_DTYPE)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + cols
            mask = row_mask[:, None] & (cc[None, :] < C)
            x = tl.load(x_rows[:, None] + cc[None, :] * stride_xc, mask=mask, other=float("-inf"))
            v = tl.load(v_rows[:, None] + cc[None, :] * stride_vc, mask=mask, other=0.0)
            dot += tl.sum(tl.exp(x.to(ACC_DTYPE) - lse[:, None]) * v.to(ACC_DTYPE), 1)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + cols
            mask = row_mask[:, None] & (cc[None, :] < C)
            x = tl.load(x_rows[:, None] + cc[None, :] * stride_xc, mask=mask, other=float("-inf"))
            v = tl.load(v_rows[:, None] + cc[None, :] * stride_vc, mask=mask, other=0.0).to(ACC_DTYPE)
            p = tl.exp(x.to(ACC_DTYPE) - lse[:, None])
            o = s[:, None] * p * (v - dot[:, None])
            tl.store(o_rows[:, None] + cc[None, :], o.to(out_ptr.dtype.element_ty), mask=mask)


def _tiles(R: int, C: int, dtype: torch.dtype, max_block_c=None):
    """(BLOCK_R, BLOCK_C, SINGLE_CHUNK, num_warps) for R rows of C classes."""
    cap = max_block_c or (MAX_BLOCK_C_FP64 if dtype == torch.float64 else MAX_BLOCK_C)
    return row_tiles(R, C, cap, warps8_at=4096)


def task_cross_entropy_fwd(logits, labels, row_weight, label_smoothing: float, ignore_index: int,
                           max_block_c=None):
    """Launch the fused forward. Returns (row_loss [T, N], dlogits [T, N, C], lse [T, N]).

    row_weight: contiguous [T, N] in the accumulation dtype (float64 for float64 logits, else
    float32); row_loss and lse come back in that dtype, dlogits in the logits dtype.
    max_block_c caps the class chunk (tests use it to exercise the multi-chunk sweep on small C).
    """
    T, N, C = logits.shape
    acc_torch, acc_tl = acc_dtypes(logits.dtype)
    row_loss = torch.empty((T, N), dtype=acc_torch, device=logits.device)
    lse = torch.empty((T, N), dtype=acc_torch, device=logits.device)
    dlogits = torch.empty((T, N, C), dtype=logits.dtype, device=logits.device)
    R = T * N
    if R == 0:
        return row_loss, dlogits, lse
    block_r, block_c, single, num_warps = _tiles(R, C, logits.dtype, max_block_c)
    _tce_fwd_kernel[(triton.cdiv(R, block_r),)](
        logits, labels, row_weight, row_loss, dlogits, lse,
        logits.stride(0), logits.stride(1), logits.stride(2),
        labels.stride(0), labels.stride(1),
        R, N, C,
        ignore_index, *split_f64(label_smoothing),
        BLOCK_R=block_r, BLOCK_C=block_c, SINGLE_CHUNK=single,
        HAS_SMOOTHING=label_smoothing > 0, ACC_DTYPE=acc_tl, num_warps=num_warps,
    )
    return row_loss, dlogits, lse


def task_cross_entropy_softmax_jvp(logits, lse, v, row_scale, max_block_c=None):
    """Launch out = row_scale * p * (v - <p, v>) with p = exp(logits - lse). Returns [T, N, C] in
    the logits dtype. lse and row_scale: contiguous [T, N] in the accumulation dtype."""
    T, N, C = logits.shape
    _, acc_tl = acc_dtypes(logits.dtype)
    out = torch.empty((T, N, C), dtype=logits.dtype, device=logits.device)
    R = T * N
    if R == 0:
        return out
    block_r, block_c, single, num_warps = _tiles(R, C, logits.dtype, max_block_c)
    _tce_softmax_jvp_kernel[(triton.cdiv(R, block_r),)](
        logits, lse, v, row_scale, out,
        logits.stride(0), logits.stride(1), logits.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        R, N, C,
        BLOCK_R=block_r, BLOCK_C=block_c, SINGLE_CHUNK=single, ACC_DTYPE=acc_tl,
        num_warps=num_warps,
    )
    return out
