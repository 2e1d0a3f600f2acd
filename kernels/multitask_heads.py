"""Triton kernel for ``multitask_heads_cross_entropy``: the H linear heads' matmul fused with each
head's softmax cross-entropy and its gradient w.r.t. the logits.

A program owns one head h and BLOCK_N rows of it. It accumulates the logits tile
[BLOCK_N, BLOCK_O] = features[h, rows] @ weight[h]^T with tl.dot over chunks of I, adds the bias, and
runs the softmax cross-entropy on the tile in registers: the logits never reach memory. It writes the
row losses and dlogits = d loss / d logits, which the backward turns into the gradients of the features,
the weight and the bias with three batched matmuls (cuBLAS through torch: that is the right tool for
them, and no elementwise work is left to fuse there).

The whole row of classes must fit one tile (O <= MAX_BLOCK_O); wider heads take the unfused path
(batched matmul, then the task_cross_entropy kernel). The launcher only allocates and launches:
argument checking and autograd live in ``metafast.ops.multitask_heads``.
"""
import os

import torch
import triton
import triton.language as tl

from ._common import acc_dtypes

# Widest head (classes) whose logits tile stays in registers.
MAX_BLOCK_O = 1024
# Elements of the logits tile per program (BLOCK_N * BLOCK_O).
_TILE = 4096


# Math (head h, row n with features x in R^I, label y, weight W in R^{O x I}, bias b, row weight w):
#   z   = W x + b                                  (tl.dot over chunks of I, fp32/fp64 accumulation)
#   lse = log sum_o exp(z_o)
#   loss = lse - z_y,     d loss / d z = softmax(z) - onehot(y)
# Stored: row_loss = w * loss and dlogits = w * (softmax(z) - onehot(y)) with w = 1/N ("mean") or
# 1 ("sum"). A label outside [0, O) is never dereferenced: its row gets NaN loss and gradient.
@triton.jit
def _mth_fwd_kernel(
    x_ptr,  # [H, N, I] features (stride_xh = 0: one [N, I] shared by every head)
    w_ptr,  # [H, O, I] head weights, any strides
    b_ptr,  # [H, O] head biases, any strides
    labels_ptr,  # [H, N] int64 class ids, any strides
    loss_ptr,  # [H, N] contiguous, ACC_DTYPE, out: w * loss
    dlogits_ptr,  # [H, N, O] contiguous, features dtype, out: w * (softmax - onehot)
    stride_xh, stride_xn, stride_xi,  # features strides
    stride_wh, stride_wo, stride_wi,  # weight strides
    stride_bh, stride_bo,  # bias strides
    stride_yh, stride_yn,  # labels strides
    N, I, O,  # rows per head, in features, classes
    BLOCK_N: tl.constexpr,  # rows per program
    BLOCK_O: tl.constexpr,  # classes (power of two >= O, >= 16 for tl.dot)
    BLOCK_K: tl.constexpr,  # chunk of in features per tl.dot
    MEAN: tl.constexpr,  # w = 1/N, else 1
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 products (no TF32)
    UPCAST: tl.constexpr,  # half inputs to fp32 before tl.dot (the CPU interpreter's half dot is wrong)
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for float64 inputs
):
    h = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = rows < N
    cols = tl.arange(0, BLOCK_O)
    col_mask = cols < O
    ks = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + h * stride_xh + rows * stride_xn
    w_cols = w_ptr + h * stride_wh + cols * stride_wo

    acc = tl.zeros([BLOCK_N, BLOCK_O], ACC_DTYPE)
    for k0 in range(0, I, BLOCK_K):
        kk = k0 + ks
        k_mask = kk < I
        a = tl.load(x_rows[:, None] + kk[None, :] * stride_xi, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_cols[None, :] + kk[:, None] * stride_wi, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(ACC_DTYPE)
            b = b.to(ACC_DTYPE)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    bias = tl.load(b_ptr + h * stride_bh + cols * stride_bo, mask=col_mask, other=0.0).to(ACC_DTYPE)
    z = tl.where(col_mask[None, :], acc + bias[None, :], float("-inf"))

    label = tl.load(labels_ptr + h * stride_yh + rows * stride_yn, mask=row_mask, other=0)
    in_range = (label >= 0) & (label < O)
    m = tl.max(z, 1)
    e = tl.exp(z - m[:, None])
    s = tl.sum(e, 1)
    lse = m + tl.log(s)
    onehot = cols[None, :] == label[:, None]
    z_y = tl.sum(tl.where(onehot, z, 0.0), 1)
    if MEAN:
        w = tl.full([BLOCK_N], 1.0, ACC_DTYPE) / N
    else:
        w = tl.full([BLOCK_N], 1.0, ACC_DTYPE)
    w = tl.where(in_range, w, float("nan"))
    tl.store(loss_ptr + h * N + rows, w * (lse - z_y), mask=row_mask)
    d = w[:, None] * (e / s[:, None] - tl.where(onehot, 1.0, 0.0))
    d_ptrs = dlogits_ptr + (h * N + rows)[:, None] * O + cols[None, :]
    tl.store(d_ptrs, d.to(dlogits_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def tiles(N: int, O: int, dtype: torch.dtype):
    """(BLOCK_N, BLOCK_O, BLOCK_K, num_warps) for heads of O classes over N rows."""
    block_o = max(16, triton.next_power_of_2(O))
    block_n = max(16, min(64, _TILE // block_o, triton.next_power_of_2(N)))
    block_k = 16 if dtype == torch.float64 or block_o >= 512 else 32
    num_warps = 8 if block_n * block_o >= 4096 else 4
    return block_n, block_o, block_k, num_warps


def multitask_heads_fwd(features, weight, bias, labels, mean: bool):
    """Launch the fused forward. Returns (row_loss [H, N] in the accumulation dtype, dlogits [H, N, O]
    in the features dtype). features: [H, N, I] or [N, I] (shared by every head); weight [H, O, I];
    bias [H, O]; labels [H, N] int64; all on one device, floats of one dtype."""
    H, O, I = weight.shape
    N = labels.shape[1]
    acc_torch, acc_tl = acc_dtypes(weight.dtype)
    if O > MAX_BLOCK_O:
        return _unfused_fwd(features, weight, bias, labels, mean)
    row_loss = torch.empty((H, N), dtype=acc_torch, device=weight.device)
    dlogits = torch.empty((H, N, O), dtype=weight.dtype, device=weight.device)
    if H == 0 or N == 0:
        return row_loss, dlogits
    if features.dim() == 2:
        sxh, sxn, sxi = 0, features.stride(0), features.stride(1)
    else:
        sxh, sxn, sxi = features.stride()
    block_n, block_o, block_k, num_warps = tiles(N, O, weight.dtype)
    _mth_fwd_kernel[(H, triton.cdiv(N, block_n))](
        features, weight, bias, labels, row_loss, dlogits,
        sxh, sxn, sxi,
        weight.stride(0), weight.stride(1), weight.stride(2),
        bias.stride(0), bias.stride(1),
        labels.stride(0), labels.stride(1),
        N, I, O,
        BLOCK_N=block_n, BLOCK_O=block_o, BLOCK_K=block_k, MEAN=mean,
        IEEE=weight.dtype == torch.float32,
        UPCAST=weight.dtype in (torch.float16, torch.bfloat16) and os.environ.get("TRITON_INTERPRET") == "1",
        ACC_DTYPE=acc_tl, num_warps=num_warps,
    )
    return row_loss, dlogits


def _unfused_fwd(features, weight, bias, labels, mean: bool):
    """Heads wider than one tile: batched matmul for the logits, then the row-chunked cross-entropy
    kernel (two kernels, the logits round-trip memory once)."""
    from metafast.kernels.task_cross_entropy import task_cross_entropy_fwd

    H, N = labels.shape
    if features.dim() == 2:
        logits = torch.matmul(features, weight.transpose(1, 2)) + bias.unsqueeze(1)
    else:
        logits = torch.baddbmm(bias.unsqueeze(1), features, weight.transpose(1, 2))
    acc_torch, _ = acc_dtypes(weight.dtype)
    row_weight = torch.full((H, N), 1.0 / max(N, 1) if mean else 1.0, dtype=acc_torch, device=weight.device)
    row_loss, dlogits, _ = task_cross_entropy_fwd(logits, labels, row_weight, 0.0, -100)
    return row_loss, dlogits
