"""Triton kernel for ``kd_loss``: the knowledge-distillation loss of each row fused with its gradient
with respect to the student logits.

Rows of all tasks are flattened (row r = t * N + n; a [B, C] input arrives as [1, B, C]). A program
owns BLOCK_R rows and sweeps the classes in chunks of BLOCK_C with three online softmaxes (student/T,
teacher/T and, with a target, student at temperature 1), so registers stay bounded for any C (128K
included). When one chunk covers C each row is read exactly once; beyond that a second sweep forms
the KL term and the gradient once the normalisers are known.

The launcher only allocates and launches: argument checks, coefficients and autograd live in
``metafast.ops.kd_loss``.
"""
import torch
import triton
import triton.language as tl

from ._common import NEG_BIG, acc_dtypes, online_softmax_update, row_tiles, split_f64

# Largest class chunk one program holds in registers (two logit tiles plus fp64 cost registers).
MAX_BLOCK_C = 2048
MAX_BLOCK_C_FP64 = 1024


# Math (one row: student s, teacher t in R^C, temperature T, label y):
#   a = s / T, b = t / T, p = softmax(a), r = softmax(b), q = softmax(s)
#   KL(r || p) = sum_c r_c (log r_c - log p_c) = sum_c r_c ((b_c - lse_b) - (a_c - lse_a))
#   CE         = lse(s) - s_y
#   loss       = w alpha T^2 KL + w (1 - alpha) CE            (CE term only with a target)
#   dloss/ds   = w alpha T (p - r) + w (1 - alpha) (q - onehot(y))
# The host folds w (1/N for "mean", else 1), alpha and T into c_kl = w alpha T^2, c_kd = w alpha T,
# c_ce = w (1 - alpha). Classes with r_c = 0 (teacher logit -inf) add nothing to KL. A label outside
# [0, C) is never dereferenced: its row gets NaN loss and gradient.
@triton.jit
def _kd_fwd_kernel(
    student_ptr,  # [T, N, C] student logits, any strides
    teacher_ptr,  # [T, N, C] teacher logits, any strides
    labels_ptr,  # [T, N] int64 class ids, any strides (unused without HAS_TARGET)
    loss_ptr,  # [T, N] contiguous, ACC_DTYPE, out: loss of each row (w folded in)
    grad_ptr,  # [T, N, C] contiguous, student dtype, out: dloss/dstudent
    stride_st, stride_sn, stride_sc,  # student strides
    stride_tt, stride_tn, stride_tc,  # teacher strides
    stride_yt, stride_yn,  # labels strides
    R, N, C,  # rows (T * N), rows per task, classes
    inv_t_hi, inv_t_lo,  # 1 / T as fp32 hi + lo parts: scalar args are fp32, and
    c_kl_hi, c_kl_lo,  #   float64 rows need the coefficients to float64 precision
    c_kd_hi, c_kd_lo,  # w alpha T
    c_ce_hi, c_ce_lo,  # w (1 - alpha)
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_C: tl.constexpr,  # classes per chunk (power of two)
    SINGLE_CHUNK: tl.constexpr,  # BLOCK_C >= C: keep the row in registers, read it once
    HAS_TARGET: tl.constexpr,  # add the hard-label cross-entropy term
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for float64 logits
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_mask = rows < R
    t_idx = rows // N
    n_idx = rows % N
    s_rows = student_ptr + t_idx * stride_st + n_idx * stride_sn
    t_rows = teacher_ptr + t_idx * stride_tt + n_idx * stride_tn
    inv_t = tl.cast(inv_t_hi, ACC_DTYPE) + tl.cast(inv_t_lo, ACC_DTYPE)
    c_kl = tl.cast(c_kl_hi, ACC_DTYPE) + tl.cast(c_kl_lo, ACC_DTYPE)
    c_kd = tl.cast(c_kd_hi, ACC_DTYPE) + tl.cast(c_kd_lo, ACC_DTYPE)
    c_ce = tl.cast(c_ce_hi, ACC_DTYPE) + tl.cast(c_ce_lo, ACC_DTYPE)
    cols = tl.arange(0, BLOCK_C)
    g_rows = grad_ptr + rows * C

    if HAS_TARGET:
        label = tl.load(labels_ptr + t_idx * stride_yt + n_idx * stride_yn, mask=row_mask, other=0)
        hit = row_mask & (label >= 0) & (label < C)
        s_y = tl.load(s_rows + tl.where(hit, label, 0) * stride_sc, mask=hit, other=0.0).to(ACC_DTYPE)
        s_y = tl.where(hit | ~row_mask, s_y, float("nan"))
    else:
        label = tl.zeros([BLOCK_R], tl.int64) - 1

    if SINGLE_CHUNK:
        mask = row_mask[:, None] & (cols[None, :] < C)
        s = tl.load(s_rows[:, None] + cols[None, :] * stride_sc, mask=mask, other=float("-inf")).to(ACC_DTYPE)
        t = tl.load(t_rows[:, None] + cols[None, :] * stride_tc, mask=mask, other=float("-inf")).to(ACC_DTYPE)
        a = s * inv_t
        b = t * inv_t
        m_a = tl.maximum(tl.max(a, 1), NEG_BIG)
        e_a = tl.exp(a - m_a[:, None])
        lse_a = m_a + tl.log(tl.sum(e_a, 1))
        m_b = tl.maximum(tl.max(b, 1), NEG_BIG)
        e_b = tl.exp(b - m_b[:, None])
        lse_b = m_b + tl.log(tl.sum(e_b, 1))
        p = tl.exp(a - lse_a[:, None])
        r = tl.exp(b - lse_b[:, None])
        # where(r > 0): masked teacher classes and padding would give 0 * (-inf - x) = NaN
        kl = tl.sum(tl.where(r > 0, r * ((b - lse_b[:, None]) - (a - lse_a[:, None])), 0.0), 1)
        loss = c_kl * kl
        d = c_kd * (p - r)
        if HAS_TARGET:
            m_s = tl.maximum(tl.max(s, 1), NEG_BIG)
            lse_s = m_s + tl.log(tl.sum(tl.exp(s - m_s[:, None]), 1))
            loss += c_ce * (lse_s - s_y)
            q = tl.exp(s - lse_s[:, None]) - tl.where(cols[None, :] == label[:, None], 1.0, 0.0)
            d += c_ce * q
        tl.store(loss_ptr + rows, loss, mask=row_mask)
        tl.store(g_rows[:, None] + cols[None, :], d.to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        m_a = tl.full([BLOCK_R], NEG_BIG, ACC_DTYPE)
        z_a = tl.zeros([BLOCK_R], ACC_DTYPE)
        m_b = tl.full([BLOCK_R], NEG_BIG, ACC_DTYPE)
        z_b = tl.zeros([BLOCK_R], ACC_DTYPE)
        m_s = tl.full([BLOCK_R], NEG_BIG, ACC_DTYPE)
        z_s = tl.zeros([BLOCK_R], ACC_DTYPE)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + cols
            mask = row_mask[:, None] & (cc[None, :] < C)
            s = tl.load(s_rows[:, None] + cc[None, :] * stride_sc, mask=mask, other=float("-inf")).to(ACC_DTYPE)
            t = tl.load(t_rows[:, None] + cc[None, :] * stride_tc, mask=mask, other=float("-inf")).to(ACC_DTYPE)
            a = s * inv_t
            b = t * inv_t
            m_a, z_a = online_softmax_update(m_a, z_a, a)
            m_b, z_b = online_softmax_update(m_b, z_b, b)
            if HAS_TARGET:
                m_s, z_s = online_softmax_update(m_s, z_s, s)
        lse_a = m_a + tl.log(z_a)
        lse_b = m_b + tl.log(z_b)
        lse_s = m_s + tl.log(z_s)
        kl = tl.zeros([BLOCK_R], ACC_DTYPE)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + cols
            mask = row_mask[:, None] & (cc[None, :] < C)
            s = tl.load(s_rows[:, None] + cc[None, :] * stride_sc, mask=mask, other=float("-inf")).to(ACC_DTYPE)
            t = tl.load(t_rows[:, None] + cc[None, :] * stride_tc, mask=mask, other=float("-inf")).to(ACC_DTYPE)
            a = s * inv_t - lse_a[:, None]  # log p
            b = t * inv_t - lse_b[:, None]  # log r
            r = tl.exp(b)
            kl += tl.sum(tl.where(r > 0, r * (b - a), 0.0), 1)
            d = c_kd * (tl.exp(a) - r)
            if HAS_TARGET:
                d += c_ce * (tl.exp(s - lse_s[:, None]) - tl.where(cc[None, :] == label[:, None], 1.0, 0.0))
            tl.store(g_rows[:, None] + cc[None, :], d.to(grad_ptr.dtype.element_ty), mask=mask)
        loss = c_kl * kl
        if HAS_TARGET:
            loss += c_ce * (lse_s - s_y)
        tl.store(loss_ptr + rows, loss, mask=row_mask)


def _tiles(R: int, C: int, dtype: torch.dtype, max_block_c=None):
    """(BLOCK_R, BLOCK_C, SINGLE_CHUNK, num_warps) for R rows of C classes."""
    cap = max_block_c or (MAX_BLOCK_C_FP64 if dtype == torch.float64 else MAX_BLOCK_C)
    return row_tiles(R, C, cap, warps8_at=2048)


def kd_loss_fwd(student, teacher, labels, inv_t: float, c_kl: float, c_kd: float, c_ce: float,
                max_block_c=None):
    """Launch the fused forward on [T, N, C] logits. Returns (row_loss [T, N] in the accumulation
    dtype, grad [T, N, C] in the student dtype). labels: int64 [T, N] or None (no CE term)."""
    T, N, C = student.shape
    acc_torch, acc_tl = acc_dtypes(student.dtype)
    row_loss = torch.empty((T, N), dtype=acc_torch, device=student.device)
    grad = torch.empty((T, N, C), dtype=student.dtype, device=student.device)
    R = T * N
    if R == 0:
        return row_loss, grad
    has_target = labels is not None
    y = labels if has_target else row_loss  # any pointer; never read
    y_strides = (labels.stride(0), labels.stride(1)) if has_target else (0, 0)
    block_r, block_c, single, num_warps = _tiles(R, C, student.dtype, max_block_c)
    _kd_fwd_kernel[(triton.cdiv(R, block_r),)](
        student, teacher, y, row_loss, grad,
        student.stride(0), student.stride(1), student.stride(2),
        teacher.stride(0), teacher.stride(1), teacher.stride(2),
        *y_strides,
        R, N, C,
        *split_f64(inv_t), *split_f64(c_kl), *split_f64(c_kd), *split_f64(c_ce),
        BLOCK_R=block_r, BLOCK_C=block_c, SINGLE_CHUNK=single, HAS_TARGET=has_target,
        ACC_DTYPE=acc_tl, num_warps=num_warps,
    )
    return row_loss, grad
