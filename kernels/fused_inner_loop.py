"""Triton kernels of ``fused_inner_loop``: the whole MAML inner loop of an MLP, and its exact reverse,
with one program per task (no autograd: metafast/ops/fused_inner_loop.py owns the op and its checks).

Model: L <= 4 linear layers, ReLU after all but the last, dims [d0, ..., dL]; the flat parameters are
W_1, b_1, ..., W_L, b_L (W_l [d_l, d_{l-1}] row-major). Per task t (program t):

Forward    W_0 = theta; for k < K: g_k = grad L_s(W_k), W_{k+1} = W_k - lr_k * g_k;
           query loss and output at W_K. The trajectory W_0..W_{K-1} is saved as [T, K, P].
Backward   Wbar_K = gq[t] * grad L_q(W_K) (W_K recomputed from W_{K-1});
           for k = K-1..0: lrbar -= Wbar_{k+1} * g_k (Meta-SGD), Wbar_k = Wbar_{k+1} - H_s(W_k)(lr_k Wbar_{k+1})
           with H v the R-operator (Pearlmutter) of the support forward+backward:
             R-forward   Rz_l = h_{l-1} V_l^T + Rh_{l-1} W_l^T + Vb_l,  Rh_l = relu'(z_l) Rz_l
             loss        MSE: Rdz_L = 2 Rz_L / (N dL);  CE: Rdz_L = p * (Rz_L - <p, Rz_L>) / N
             R-backward  RdW_l = Rdz_l^T h_{l-1} + dz_l^T Rh_{l-1},  Rdb_l = sum_rows Rdz_l,
                         Rdz_{l-1} = relu'(z_{l-1}) (Rdz_l W_l + dz_l V_l)
           The per-task Wbar_0 and lrbar rows are summed over tasks by the launcher (deterministic).

Activations live in a per-task global scratch (a few KB to MB, L2-resident): slot j of each buffer
holds the [N, d_j] activations of layer j (slot 0 = the input). Every phase ends with a CTA barrier,
since the next phase reads what other threads of the program wrote. Matrix tiles are BLOCK x BLOCK:
tl.dot in IEEE fp32 for float32 (no TF32: the tests compare against float64), broadcast-multiply-sum
for float64. Accumulation is in the input dtype (float32 or float64).
All launchers run under TRITON_INTERPRET=1 on CPU tensors as well.
"""
import contextlib
import os
from typing import List, Tuple

import torch
import triton
import triton.language as tl

from ._common import acc_dtypes

LOSS_MSE = 0
LOSS_CE = 1
N_ACT = 6     # activation buffers per task: H, Z, DZ, RZ, RH, RDZ
N_VEC = 4     # [P] vectors per task: G (gradient), V (direction), HV, WB (Wbar)


# ------------------------------------------------------------------------------------------ helpers
@triton.jit
def _geom(l: tl.constexpr, D0, D1, D2, D3, D4, NMAX):
    """(d_in, d_out, offset of W_{l+1} in theta, offset of activation slot l) of 0-based layer l."""
    din = D0
    dout = D1
    woff = 0
    aoff = 0
    if l >= 1:
        woff = woff + D1 * (D0 + 1)
        aoff = aoff + NMAX * D0
        din = D1
        dout = D2
    if l >= 2:
        woff = woff + D2 * (D1 + 1)
        aoff = aoff + NMAX * D1
        din = D2
        dout = D3
    if l >= 3:
        woff = woff + D3 * (D2 + 1)
        aoff = aoff + NMAX * D2
        din = D3
        dout = D4
    return din, dout, woff, aoff


# C[M, N] = A @ B (+ A2 @ B2) (+ bias[None, :]), A/B given by (pointer, row stride, col stride);
# C (and Z, C2) are contiguous [M, N]. Epilogue EPI: 0 C = acc; 1 C = acc, C2 = relu(acc);
# 2 C = acc * (Z > 0); 3 C = acc, C2 = acc * (Z > 0).
@triton.jit
def _mm(a_ptr, sam, sak, b_ptr, sbk, sbn, a2_ptr, sa2m, sa2k, b2_ptr, sb2k, sb2n, bias_ptr, z_ptr, c_ptr, c2_ptr,
        M, N, K,
        TWO: tl.constexpr, BIAS: tl.constexpr, EPI: tl.constexpr, BLOCK: tl.constexpr,
        USE_DOT: tl.constexpr, ACC: tl.constexpr):
    r = tl.arange(0, BLOCK)
    for m0 in range(0, M, BLOCK):
        rm = m0 + r
        mm_ = rm < M
        for n0 in range(0, N, BLOCK):
            rn = n0 + r
            nm = rn < N
            acc = tl.zeros([BLOCK, BLOCK], dtype=ACC)
            for k0 in range(0, K, BLOCK):
                rk = k0 + r
                km = rk < K
                a = tl.load(a_ptr + rm[:, None] * sam + rk[None, :] * sak, mask=mm_[:, None] & km[None, :], other=0.0)
                b = tl.load(b_ptr + rk[:, None] * sbk + rn[None, :] * sbn, mask=km[:, None] & nm[None, :], other=0.0)
                if USE_DOT:
                    acc += tl.dot(a, b, input_precision="ieee")
                else:
                    acc += tl.sum(a[:, :, None] * b[None, :, :], axis=1)
                if TWO:
                    a2 = tl.load(a2_ptr + rm[:, None] * sa2m + rk[None, :] * sa2k, mask=mm_[:, None] & km[None, :],
                                 other=0.0)
                    b2 = tl.load(b2_ptr + rk[:, None] * sb2k + rn[None, :] * sb2n, mask=km[:, None] & nm[None, :],
                                 other=0.0)
                    if USE_DOT:
                        acc += tl.dot(a2, b2, input_precision="ieee")
                    else:
                        acc += tl.sum(a2[:, :, None] * b2[None, :, :], axis=1)
            if BIAS:
                acc += tl.load(bias_ptr + rn, mask=nm, other=0.0)[None, :]
            offs = rm[:, None] * N + rn[None, :]
            cm = mm_[:, None] & nm[None, :]
            if EPI == 0:
                tl.store(c_ptr + offs, acc, mask=cm)
            elif EPI == 1:
                tl.store(c_ptr + offs, acc, mask=cm)
                tl.store(c2_ptr + offs, tl.where(acc < 0, 0.0, acc), mask=cm)  # NaN stays NaN, as in torch.relu
            elif EPI == 2:
                z = tl.load(z_ptr + offs, mask=cm, other=0.0)
                tl.store(c_ptr + offs, tl.where(z > 0, acc, 0.0), mask=cm)
            else:
                z = tl.load(z_ptr + offs, mask=cm, other=0.0)
                tl.store(c_ptr + offs, acc, mask=cm)
                tl.store(c2_ptr + offs, tl.where(z > 0, acc, 0.0), mask=cm)
    tl.debug_barrier()


# out[j] = sum_i A[i, j] over a contiguous [M, N] matrix.
@triton.jit
def _colsum(a_ptr, out_ptr, M, N, BLOCK: tl.constexpr, ACC: tl.constexpr):
    r = tl.arange(0, BLOCK)
    for n0 in range(0, N, BLOCK):
        rn = n0 + r
        nm = rn < N
        acc = tl.zeros([BLOCK], dtype=ACC)
        for m0 in range(0, M, BLOCK):
            rm = m0 + r
            a = tl.load(a_ptr + rm[:, None] * N + rn[None, :], mask=(rm[:, None] < M) & nm[None, :], other=0.0)
            acc += tl.sum(a, axis=0)
        tl.store(out_ptr + rn, acc, mask=nm)
    tl.debug_barrier()


# Vector ops over [P]. MODE 0: dst = src; 1: dst = src - lr * x (the SGD step);
# 2: dst = lr * x; 3: dst = src - x; 4: dst = src - a * x (a: a second vector, no lr).
@triton.jit
def _vec(dst_ptr, src_ptr, x_ptr, lr_ptr, a_ptr, k, P, MODE: tl.constexpr, LR_PER_PARAM: tl.constexpr,
         VBLOCK: tl.constexpr):
    r = tl.arange(0, VBLOCK)
    if MODE == 1 or MODE == 2:
        if not LR_PER_PARAM:
            lr_s = tl.load(lr_ptr + k)
    for p0 in range(0, P, VBLOCK):
        rp = p0 + r
        pm = rp < P
        if MODE == 0:
            v = tl.load(src_ptr + rp, mask=pm, other=0.0)
        elif MODE == 1 or MODE == 2:
            x = tl.load(x_ptr + rp, mask=pm, other=0.0)
            if LR_PER_PARAM:
                lr = tl.load(lr_ptr + rp, mask=pm, other=0.0)
            else:
                lr = lr_s
            if MODE == 1:
                v = tl.load(src_ptr + rp, mask=pm, other=0.0) - lr * x
            else:
                v = lr * x
        elif MODE == 3:
            v = tl.load(src_ptr + rp, mask=pm, other=0.0) - tl.load(x_ptr + rp, mask=pm, other=0.0)
        else:
            v = tl.load(src_ptr + rp, mask=pm, other=0.0) - tl.load(a_ptr + rp, mask=pm, other=0.0) * \
                tl.load(x_ptr + rp, mask=pm, other=0.0)
        tl.store(dst_ptr + rp, v, mask=pm)
    tl.debug_barrier()


# The per-task loss of the outputs Z [N, DL] and its gradient DZ = scale * dloss/dZ.
#   MSE: loss = mean (Z - Y)^2, DZ = 2 (Z - Y) / (N DL)
#   CE:  loss = mean_n logsumexp(Z_n) - Z_n[y_n], DZ = (softmax(Z) - onehot(y)) / N
@triton.jit
def _loss_grad(z_ptr, y_ptr, dz_ptr, N, DL, scale, LOSS: tl.constexpr, WITH_GRAD: tl.constexpr,
               BLOCK: tl.constexpr, DLP: tl.constexpr, ACC: tl.constexpr):
    rc = tl.arange(0, DLP)
    cm = rc < DL
    total = tl.zeros([BLOCK], dtype=ACC)
    if LOSS == 0:
        denom = tl.zeros([BLOCK, DLP], dtype=ACC) + N * DL
    else:
        denom = tl.zeros([BLOCK, DLP], dtype=ACC) + N
    for m0 in range(0, N, BLOCK):
        rm = m0 + tl.arange(0, BLOCK)
        rmask = rm < N
        msk = rmask[:, None] & cm[None, :]
        offs = rm[:, None] * DL + rc[None, :]
        z = tl.load(z_ptr + offs, mask=msk, other=0.0)
        if LOSS == 0:
            d = z - tl.load(y_ptr + offs, mask=msk, other=0.0)
            total += tl.sum(d * d, axis=1)
            if WITH_GRAD:
                tl.store(dz_ptr + offs, scale * (2.0 * d / denom), mask=msk)
        else:
            zz = tl.where(cm[None, :], z, float("-inf"))
            mx = tl.max(zz, axis=1)
            e = tl.exp(zz - mx[:, None])
            s = tl.sum(e, axis=1)
            lab = tl.load(y_ptr + rm, mask=rmask, other=0)
            hit = rc[None, :] == lab[:, None]
            zy = tl.sum(tl.where(hit, z, 0.0), axis=1)
            total += tl.where(rmask, mx + tl.log(s) - zy, 0.0)
            if WITH_GRAD:
                g = (e / s[:, None] - tl.where(hit, 1.0, 0.0)) / denom
                tl.store(dz_ptr + offs, scale * g, mask=msk)
    tl.debug_barrier()
    return tl.sum(total / tl.sum(denom, axis=1) * DLP, axis=0)


# The R-operator of the loss gradient: RDZ = R{DZ} given RZ = R{Z}.
@triton.jit
def _loss_r(z_ptr, rz_ptr, rdz_ptr, N, DL, LOSS: tl.constexpr, BLOCK: tl.constexpr, DLP: tl.constexpr,
            ACC: tl.constexpr):
    rc = tl.arange(0, DLP)
    cm = rc < DL
    if LOSS == 0:
        denom = tl.zeros([BLOCK, DLP], dtype=ACC) + N * DL
    else:
        denom = tl.zeros([BLOCK, DLP], dtype=ACC) + N
    for m0 in range(0, N, BLOCK):
        rm = m0 + tl.arange(0, BLOCK)
        msk = (rm[:, None] < N) & cm[None, :]
        offs = rm[:, None] * DL + rc[None, :]
        rz = tl.load(rz_ptr + offs, mask=msk, other=0.0)
        if LOSS == 0:
            tl.store(rdz_ptr + offs, 2.0 * rz / denom, mask=msk)
        else:
            z = tl.load(z_ptr + offs, mask=msk, other=0.0)
            zz = tl.where(cm[None, :], z, float("-inf"))
            e = tl.exp(zz - tl.max(zz, axis=1)[:, None])
            p = e / tl.sum(e, axis=1)[:, None]
            pr = tl.sum(p * rz, axis=1)
            tl.store(rdz_ptr + offs, p * (rz - pr[:, None]) / denom, mask=msk)
    tl.debug_barrier()


# Forward of the MLP at weights w on x [N, D0]: H slot 0 = x, Z/H slot l+1 = layer l's output.
@triton.jit
def _forward(w_ptr, x_ptr, H, Z, N, D0, D1, D2, D3, D4, NMAX,
             L: tl.constexpr, BLOCK: tl.constexpr, VBLOCK: tl.constexpr, USE_DOT: tl.constexpr, ACC: tl.constexpr):
    _vec(H, x_ptr, x_ptr, x_ptr, x_ptr, 0, N * D0, 0, False, VBLOCK)
    for l in tl.static_range(L):
        din, dout, woff, aoff = _geom(l, D0, D1, D2, D3, D4, NMAX)
        aout = aoff + NMAX * din
        # z = h W^T + b: B = W^T has B[k, n] = W[n, k]
        _mm(H + aoff, din, 1, w_ptr + woff, 1, din, H, 0, 0, H, 0, 0, w_ptr + woff + dout * din, H,
            Z + aout, H + aout, N, dout, din, False, True, 1, BLOCK, USE_DOT, ACC)


# Gradient of the loss whose output gradient is in DZ slot L: into g_ptr [P].
@triton.jit
def _backward(w_ptr, g_ptr, H, Z, DZ, N, D0, D1, D2, D3, D4, NMAX,
              L: tl.constexpr, BLOCK: tl.constexpr, USE_DOT: tl.constexpr, ACC: tl.constexpr):
    for i in tl.static_range(L):
        l = L - 1 - i
        din, dout, woff, aoff = _geom(l, D0, D1, D2, D3, D4, NMAX)
        aout = aoff + NMAX * din
        # dW = dz^T h: A = dz^T has A[m, k] = dz[k, m]
        _mm(DZ + aout, 1, dout, H + aoff, din, 1, H, 0, 0, H, 0, 0, H, H, g_ptr + woff, H,
            dout, din, N, False, False, 0, BLOCK, USE_DOT, ACC)
        _colsum(DZ + aout, g_ptr + woff + dout * din, N, dout, BLOCK, ACC)
        if l > 0:
            # dz_{l-1} = relu'(z_{l-1}) * (dz_l W_l)
            _mm(DZ + aout, dout, 1, w_ptr + woff, din, 1, H, 0, 0, H, 0, 0, H, Z + aoff, DZ + aoff, H,
                N, din, dout, False, False, 2, BLOCK, USE_DOT, ACC)


# HV = H_s(W) v for the direction in v_ptr [P] (support forward/backward already in H, Z, DZ).
@triton.jit
def _hvp(w_ptr, v_ptr, hv_ptr, y_ptr, H, Z, DZ, RZ, RH, RDZ, N, D0, D1, D2, D3, D4, NMAX,
         L: tl.constexpr, LOSS: tl.constexpr, BLOCK: tl.constexpr, DLP: tl.constexpr,
         USE_DOT: tl.constexpr, ACC: tl.constexpr):
    for l in tl.static_range(L):
        din, dout, woff, aoff = _geom(l, D0, D1, D2, D3, D4, NMAX)
        aout = aoff + NMAX * din
        if l == 0:  # Rh_0 = 0
            _mm(H + aoff, din, 1, v_ptr + woff, 1, din, H, 0, 0, H, 0, 0, v_ptr + woff + dout * din, Z + aout,
                RZ + aout, RH + aout, N, dout, din, False, True, 3, BLOCK, USE_DOT, ACC)
        else:
            _mm(H + aoff, din, 1, v_ptr + woff, 1, din, RH + aoff, din, 1, w_ptr + woff, 1, din,
                v_ptr + woff + dout * din, Z + aout, RZ + aout, RH + aout, N, dout, din, True, True, 3, BLOCK,
                USE_DOT, ACC)
    dl_, dL_, wl_, al_ = _geom(L - 1, D0, D1, D2, D3, D4, NMAX)
    alast = al_ + NMAX * dl_
    _loss_r(Z + alast, RZ + alast, RDZ + alast, N, dL_, LOSS, BLOCK, DLP, ACC)
    for i in tl.static_range(L):
        l = L - 1 - i
        din, dout, woff, aoff = _geom(l, D0, D1, D2, D3, D4, NMAX)
        aout = aoff + NMAX * din
        if l == 0:  # RdW = Rdz^T h
            _mm(RDZ + aout, 1, dout, H + aoff, din, 1, H, 0, 0, H, 0, 0, H, H, hv_ptr + woff, H,
                dout, din, N, False, False, 0, BLOCK, USE_DOT, ACC)
        else:       # RdW = Rdz^T h + dz^T Rh
            _mm(RDZ + aout, 1, dout, H + aoff, din, 1, DZ + aout, 1, dout, RH + aoff, din, 1, H, H,
                hv_ptr + woff, H, dout, din, N, True, False, 0, BLOCK, USE_DOT, ACC)
        _colsum(RDZ + aout, hv_ptr + woff + dout * din, N, dout, BLOCK, ACC)
        if l > 0:
            # Rdz_{l-1} = relu'(z_{l-1}) * (Rdz_l W_l + dz_l V_l)
            _mm(RDZ + aout, dout, 1, w_ptr + woff, din, 1, DZ + aout, dout, 1, v_ptr + woff, din, 1, H,
                Z + aoff, RDZ + aoff, H, N, din, dout, True, False, 2, BLOCK, USE_DOT, ACC)


# ------------------------------------------------------------------------------------------ kernels
# One program per task: the inner loop (see the module docstring).
@triton.jit
def _fused_inner_loop_fwd_kernel(
    theta_ptr,      # [P] meta-parameters
    lr_ptr,         # [K] per-step rates, or [P] (LR_PER_PARAM)
    sx_ptr, sy_ptr,  # [T, Ns, D0], [T, Ns, DL] or [T, Ns] int64 labels
    qx_ptr, qy_ptr,  # [T, Nq, D0], [T, Nq, DL] or [T, Nq]
    qloss_ptr,      # [T] out
    sloss_ptr,      # [T] out
    fast_ptr,       # [T, P] out (also the running weights)
    qout_ptr,       # [T, Nq, DL] out
    saved_ptr,      # [T, K, P] out (SAVE): W_0..W_{K-1}
    scratch_ptr,    # [T, SCRATCH] activations
    SCRATCH, AS,    # scratch row length, one activation buffer's length
    P, Ns, Nq, NMAX, K,
    D0, D1, D2, D3, D4,
    L: tl.constexpr, LOSS: tl.constexpr, LR_PER_PARAM: tl.constexpr, SAVE: tl.constexpr,
    BLOCK: tl.constexpr, VBLOCK: tl.constexpr, DLP: tl.constexpr, USE_DOT: tl.constexpr, ACC: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    dl_, DL, wl_, al_ = _geom(L - 1, D0, D1, D2, D3, D4, NMAX)
    alast = al_ + NMAX * dl_
    base = scratch_ptr + t * SCRATCH
    H = base
    Z = base + AS
    DZ = base + 2 * AS
    G = base + 6 * AS  # after the N_ACT activation buffers
    W = fast_ptr + t * P
    sx = sx_ptr + t * Ns * D0
    qx = qx_ptr + t * Nq * D0
    if LOSS == 0:
        sy = sy_ptr + t * Ns * DL
        qy = qy_ptr + t * Nq * DL
    else:
        sy = sy_ptr + t * Ns
        qy = qy_ptr + t * Nq
    _vec(W, theta_ptr, theta_ptr, theta_ptr, theta_ptr, 0, P, 0, False, VBLOCK)
    for k in range(0, K):
        if SAVE:
            _vec(saved_ptr + (t * K + k) * P, W, W, W, W, 0, P, 0, False, VBLOCK)
        _forward(W, sx, H, Z, Ns, D0, D1, D2, D3, D4, NMAX, L, BLOCK, VBLOCK, USE_DOT, ACC)
        ls = _loss_grad(Z + alast, sy, DZ + alast, Ns, DL, 1.0, LOSS, True, BLOCK, DLP, ACC)
        tl.store(sloss_ptr + t, ls)
        _backward(W, G, H, Z, DZ, Ns, D0, D1, D2, D3, D4, NMAX, L, BLOCK, USE_DOT, ACC)
        _vec(W, W, G, lr_ptr, W, k, P, 1, LR_PER_PARAM, VBLOCK)
    _forward(W, qx, H, Z, Nq, D0, D1, D2, D3, D4, NMAX, L, BLOCK, VBLOCK, USE_DOT, ACC)
    lq = _loss_grad(Z + alast, qy, DZ + alast, Nq, DL, 1.0, LOSS, False, BLOCK, DLP, ACC)
    tl.store(qloss_ptr + t, lq)
    _vec(qout_ptr + t * Nq * DL, Z + alast, Z, Z, Z, 0, Nq * DL, 0, False, VBLOCK)


# One program per task: the exact reverse (see the module docstring). Writes the task's Wbar_0 to
# the WB slot of its scratch row and its lrbar contribution to glr [T, P] (LR_PER_PARAM).
@triton.jit
def _fused_inner_loop_bwd_kernel(
    gq_ptr,         # [T] upstream gradient of query_loss
    lr_ptr,         # [K] or [P] (LR_PER_PARAM)
    sx_ptr, sy_ptr,  # support set
    qx_ptr, qy_ptr,  # query set
    saved_ptr,      # [T, K, P] W_0..W_{K-1}
    glr_ptr,        # [T, P] out (LR_PER_PARAM)
    wk_ptr,         # [T, P] scratch: W_K
    scratch_ptr,    # [T, SCRATCH] activations and vectors
    SCRATCH, AS,
    P, Ns, Nq, NMAX, K,
    D0, D1, D2, D3, D4,
    L: tl.constexpr, LOSS: tl.constexpr, LR_PER_PARAM: tl.constexpr, FIRST_ORDER: tl.constexpr,
    BLOCK: tl.constexpr, VBLOCK: tl.constexpr, DLP: tl.constexpr, USE_DOT: tl.constexpr, ACC: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    dl_, DL, wl_, al_ = _geom(L - 1, D0, D1, D2, D3, D4, NMAX)
    alast = al_ + NMAX * dl_
    base = scratch_ptr + t * SCRATCH
    H = base
    Z = base + AS
    DZ = base + 2 * AS
    RZ = base + 3 * AS
    RH = base + 4 * AS
    RDZ = base + 5 * AS
    G = base + 6 * AS  # after the N_ACT activation buffers
    V = G + P
    HV = G + 2 * P
    WB = G + 3 * P
    WK = wk_ptr + t * P
    traj = saved_ptr + t * K * P
    sx = sx_ptr + t * Ns * D0
    qx = qx_ptr + t * Nq * D0
    if LOSS == 0:
        sy = sy_ptr + t * Ns * DL
        qy = qy_ptr + t * Nq * DL
    else:
        sy = sy_ptr + t * Ns
        qy = qy_ptr + t * Nq
    gq = tl.load(gq_ptr + t)
    # W_K = W_{K-1} - lr_{K-1} g_{K-1}
    wlast = traj + (K - 1) * P
    _forward(wlast, sx, H, Z, Ns, D0, D1, D2, D3, D4, NMAX, L, BLOCK, VBLOCK, USE_DOT, ACC)
    _loss_grad(Z + alast, sy, DZ + alast, Ns, DL, 1.0, LOSS, True, BLOCK, DLP, ACC)
    _backward(wlast, G, H, Z, DZ, Ns, D0, D1, D2, D3, D4, NMAX, L, BLOCK, USE_DOT, ACC)
    _vec(WK, wlast, G, lr_ptr, WK, K - 1, P, 1, LR_PER_PARAM, VBLOCK)
    # Wbar_K = gq * grad L_q(W_K)
    _forward(WK, qx, H, Z, Nq, D0, D1, D2, D3, D4, NMAX, L, BLOCK, VBLOCK, USE_DOT, ACC)
    _loss_grad(Z + alast, qy, DZ + alast, Nq, DL, gq, LOSS, True, BLOCK, DLP, ACC)
    _backward(WK, WB, H, Z, DZ, Nq, D0, D1, D2, D3, D4, NMAX, L, BLOCK, USE_DOT, ACC)
    if LR_PER_PARAM or not FIRST_ORDER:
        for i in range(0, K):
            k = K - 1 - i
            wk = traj + k * P
            _forward(wk, sx, H, Z, Ns, D0, D1, D2, D3, D4, NMAX, L, BLOCK, VBLOCK, USE_DOT, ACC)
            _loss_grad(Z + alast, sy, DZ + alast, Ns, DL, 1.0, LOSS, True, BLOCK, DLP, ACC)
            _backward(wk, G, H, Z, DZ, Ns, D0, D1, D2, D3, D4, NMAX, L, BLOCK, USE_DOT, ACC)
            if LR_PER_PARAM:
                # glr -= Wbar_{k+1} * g_k
                _vec(glr_ptr + t * P, glr_ptr + t * P, G, lr_ptr, WB, k, P, 4, LR_PER_PARAM, VBLOCK)
            if not FIRST_ORDER:
                _vec(V, V, WB, lr_ptr, V, k, P, 2, LR_PER_PARAM, VBLOCK)
                _hvp(wk, V, HV, sy, H, Z, DZ, RZ, RH, RDZ, Ns, D0, D1, D2, D3, D4, NMAX, L, LOSS, BLOCK, DLP,
                     USE_DOT, ACC)
                _vec(WB, WB, HV, lr_ptr, WB, k, P, 3, LR_PER_PARAM, VBLOCK)


# ------------------------------------------------------------------------------------------ launchers
def _config(dims: List[int], dtype: torch.dtype, device: torch.device, interpret: bool):
    L = len(dims) - 1
    d = list(dims) + [1] * (5 - len(dims))
    use_dot = dtype == torch.float32
    if interpret:
        block = 16       # small tiles exercise the tile loops and masks on the test shapes
    else:
        block = 32 if use_dot else 16
    dlp = max(16, triton.next_power_of_2(dims[-1]))
    acc = acc_dtypes(dtype)[1]
    return L, d, use_dot, block, dlp, acc


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _scratch(T: int, dims: List[int], nmax: int, P: int, like: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
    act = nmax * sum(dims)
    width = N_ACT * act + N_VEC * P
    return torch.empty(T, width, dtype=like.dtype, device=like.device), width, act


def fused_inner_loop_fwd(theta, lr, sx, sy, qx, qy, dims, steps, loss_kind, lr_per_param, save_for_backward):
    """The contract's forward: (query_loss [T], support_loss [T], fast [T, P], query_out [T, Nq, dL], saved)."""
    T, Ns, _ = sx.shape
    Nq = qx.shape[1]
    P = theta.shape[0]
    K = int(steps)
    dims = [int(x) for x in dims]
    L, d, use_dot, block, dlp, acc = _config(dims, theta.dtype, theta.device, _interpreting())
    nmax = max(Ns, Nq)
    qloss = theta.new_empty(T)
    sloss = theta.new_empty(T)
    fast = theta.new_empty(T, P)
    qout = theta.new_empty(T, Nq, dims[-1])
    saved = theta.new_empty(T, K, P) if save_for_backward else theta.new_empty(0)
    if T == 0:
        return qloss, sloss, fast, qout, saved
    scratch, width, act = _scratch(T, dims, nmax, P, theta)
    with torch.cuda.device(theta.device) if theta.is_cuda else contextlib.nullcontext():
        _fused_inner_loop_fwd_kernel[(T,)](
            theta, lr, sx, sy, qx, qy, qloss, sloss, fast, qout, saved if save_for_backward else fast, scratch,
            width, act, P, Ns, Nq, nmax, K, d[0], d[1], d[2], d[3], d[4],
            L=L, LOSS=int(loss_kind), LR_PER_PARAM=bool(lr_per_param), SAVE=bool(save_for_backward),
            BLOCK=block, VBLOCK=256, DLP=dlp, USE_DOT=use_dot, ACC=acc, num_warps=4)
    return qloss, sloss, fast, qout, saved


def fused_inner_loop_bwd(grad_query_loss, theta, lr, sx, sy, qx, qy, saved, dims, steps, loss_kind, lr_per_param,
                         first_order):
    """The contract's backward: (grad_theta [P], grad_lr [P] or empty). An empty ``saved`` recomputes it."""
    T, Ns, _ = sx.shape
    Nq = qx.shape[1]
    P = theta.shape[0]
    K = int(steps)
    dims = [int(x) for x in dims]
    if saved.numel() == 0:
        saved = fused_inner_loop_fwd(theta, lr, sx, sy, qx, qy, dims, steps, loss_kind, lr_per_param, True)[4]
    if T == 0:
        return theta.new_zeros(P), (theta.new_zeros(P) if lr_per_param else theta.new_empty(0))
    L, d, use_dot, block, dlp, acc = _config(dims, theta.dtype, theta.device, _interpreting())
    nmax = max(Ns, Nq)
    scratch, width, act = _scratch(T, dims, nmax, P, theta)
    glr = theta.new_zeros(T, P) if lr_per_param else theta.new_empty(1)
    wk = theta.new_empty(T, P)
    gq = grad_query_loss.contiguous()
    with torch.cuda.device(theta.device) if theta.is_cuda else contextlib.nullcontext():
        _fused_inner_loop_bwd_kernel[(T,)](
            gq, lr, sx, sy, qx, qy, saved.contiguous(), glr, wk, scratch,
            width, act, P, Ns, Nq, nmax, K, d[0], d[1], d[2], d[3], d[4],
            L=L, LOSS=int(loss_kind), LR_PER_PARAM=bool(lr_per_param), FIRST_ORDER=bool(first_order),
            BLOCK=block, VBLOCK=256, DLP=dlp, USE_DOT=use_dot, ACC=acc, num_warps=4)
    wb0 = N_ACT * act + 3 * P
    grad_theta = scratch[:, wb0:wb0 + P].sum(0)
    grad_lr = glr.sum(0) if lr_per_param else theta.new_empty(0)
    return grad_theta, grad_lr

