// The whole MAML inner loop of an MLP for one task, and the exact reverse of it, written once for both
// the CPU and the CUDA launchers.
//
// Model: L linear layers (1 <= L <= 4), dims d_0..d_L (each <= 256), ReLU after all but the last.
// theta [P] in nn.Sequential order: for each layer W_l [d_l, d_{l-1}] row-major, then b_l [d_l].
//
// Forward, per task:   W_0 = theta;  W_{k+1} = W_k - lr_k * grad L_s(W_k)   (k < K);  L_q(W_K).
// Backward, per task:  Wbar_K = gq * grad L_q(W_K);  for k = K-1..0:
//                        lrbar -= Wbar_{k+1} * g_k                       (Meta-SGD)
//                        Wbar_k = Wbar_{k+1} - H_s(W_k) (lr_k * Wbar_{k+1}) (unless first order)
// H_s v is Pearlmutter's R-operator of the support forward + backward (no Hessian is formed).
//
// Every routine is a template over the scalar type and an execution policy `Ex` with members
// tid, nthreads and sync(): the work of a stage is split by strided loops over output elements,
// and stages are separated by ex.sync(). The CUDA launcher runs one block per task (sync() =
// __syncthreads()); the CPU launcher (fused_inner_loop_cpu.h) runs the same code with tid = 0,
// nthreads = 1 and T = a SIMD vector holding one scalar of each of W tasks, so every operation of
// the per-task code runs for W tasks at once. So the CPU tests exercise the code that runs on the
// GPU, barriers aside.
//
// A work item covers Ex::vec<T>() consecutive outputs of a row (CPU: several independent FMA
// chains; GPU: one output per thread, accumulated in a register), and the innermost loops have a
// compile-time trip count. Dot products keep Ex::kLanes partial sums.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define MF_HD __host__ __device__ inline
#else
#define MF_HD inline
#endif

namespace metafast {
namespace fused_inner_loop {

constexpr int kMaxLayers = 4;
constexpr int kMaxDim = 256;
// Workspace buffers start on multiples of this many elements (aligned vector loads on the CPU).
constexpr int kAlign = 16;

enum LossKind : int { kMSE = 0, kCE = 1 };

// Sizes and offsets of one problem, computed on the host and passed by value to every task.
struct Plan {
  int L;                        // number of linear layers
  int d[kMaxLayers + 1];        // dims d_0..d_L
  int64_t woff[kMaxLayers];     // offset of W_l (l = 1..L stored at [l - 1]) in theta
  int64_t boff[kMaxLayers];     // offset of b_l in theta
  int64_t P;                    // number of parameters
  int Ns, Nq;                   // support / query rows
  int K;                        // inner steps
  int loss_kind;                // LossKind
  bool lr_per_param;            // lr is [P] (Meta-SGD) rather than [K]
  // Per-task workspace, element offsets (of scalar_t). [P] buffers:
  int64_t w, g, wq, wbar, hv, wt, vt;  // wt / vt: transposed weights of W / of the R direction
  // Activations, per layer l = 1..L at [l - 1]: a = post-ReLU output (the logits for l = L),
  // dz = d loss / d pre-activation, ra / rdz = their R-versions (support only), for the support
  // rows (s*) and the query rows (q*).
  int64_t sa[kMaxLayers], sdz[kMaxLayers], sra[kMaxLayers], srdz[kMaxLayers];
  int64_t qa[kMaxLayers], qdz[kMaxLayers];
  int64_t prob;                 // CE: softmax of the support logits [Ns, d_L]
  int64_t size;                 // total elements per task
  // What the forward saves per task for the backward (offsets into the task's saved [saved_size]):
  // the trajectory W_1..W_{K-1} at (k - 1) * P (W_0 is theta, which the backward gets), then the
  // last inner step's tape: the query gradient grad L_q(W_K) (tgq), its gradient G_{K-1} (tg; only
  // Meta-SGD's lr gradient reads it), the support activations and loss gradients (tsa, tsdz) and
  // the CE softmax (tprob). The backward starts from these instead of recomputing them.
  int64_t tg, tgq, tsa[kMaxLayers], tsdz[kMaxLayers], tprob;
  int64_t saved_size;
};

inline int64_t align_up(int64_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

// Lays out the per-task workspace. Returns false when dims are out of range.
inline Plan make_plan(const int64_t* dims, int ndims, int Ns, int Nq, int K, int loss_kind, bool lr_per_param) {
  Plan p{};
  p.L = ndims - 1;
  for (int l = 0; l < ndims; ++l) p.d[l] = static_cast<int>(dims[l]);
  int64_t off = 0;
  for (int l = 1; l <= p.L; ++l) {
    p.woff[l - 1] = off;
    off += static_cast<int64_t>(p.d[l]) * p.d[l - 1];
    p.boff[l - 1] = off;
    off += p.d[l];
  }
  p.P = off;
  p.Ns = Ns;
  p.Nq = Nq;
  p.K = K;
  p.loss_kind = loss_kind;
  p.lr_per_param = lr_per_param;
  int64_t at = 0;
  auto take = [&at](int64_t n) {
    const int64_t o = at;
    at += align_up(n);
    return o;
  };
  p.w = take(p.P);
  p.g = take(p.P);
  p.wq = take(p.P);
  p.wbar = take(p.P);
  p.hv = take(p.P);
  p.wt = take(p.P);
  p.vt = take(p.P);
  for (int l = 1; l <= p.L; ++l) {
    const int64_t ns = static_cast<int64_t>(Ns) * p.d[l], nq = static_cast<int64_t>(Nq) * p.d[l];
    p.sa[l - 1] = take(ns);
    p.sdz[l - 1] = take(ns);
    p.sra[l - 1] = take(ns);
    p.srdz[l - 1] = take(ns);
    p.qa[l - 1] = take(nq);
    p.qdz[l - 1] = take(nq);
  }
  p.prob = take(loss_kind == kCE ? static_cast<int64_t>(Ns) * p.d[p.L] : 0);
  p.size = at;
  int64_t so = static_cast<int64_t>(K - 1) * p.P;
  p.tgq = so;
  so += p.P;
  p.tg = so;
  if (lr_per_param) so += p.P;
  for (int l = 1; l <= p.L; ++l) {
    p.tsa[l - 1] = so;
    p.tsdz[l - 1] = so + static_cast<int64_t>(Ns) * p.d[l];
    so += 2 * static_cast<int64_t>(Ns) * p.d[l];
  }
  p.tprob = so;
  p.saved_size = so + (loss_kind == kCE ? static_cast<int64_t>(Ns) * p.d[p.L] : 0);
  return p;
}

#ifdef __CUDACC__
#define MF_EXP(x) ::exp(x)  // CUDA's float / double overloads
#define MF_LOG(x) ::log(x)
#else
#define MF_EXP(x) std::exp(x)
#define MF_LOG(x) std::log(x)
#endif

template <typename T>
MF_HD T mf_max(T a, T b) { return a > b ? a : b; }

// max(0, x), and x where m > 0 else 0 (relu'(z) read off the post-ReLU activation m). The CPU's
// task-vector type has its own overloads (found by argument-dependent lookup).
template <typename T>
MF_HD T relu_of(T x) { return x < T(0) ? T(0) : x; }  // NaN stays NaN, as in torch.relu
template <typename T>
MF_HD T where_pos(T m, T x) { return m > T(0) ? x : T(0); }

// sum_i x[i] * y[i] with kLanes independent partial sums (vectorizable on the CPU as written).
template <int kLanes, typename T>
MF_HD T dot(const T* __restrict__ x, const T* __restrict__ y, int n) {
  T s[kLanes];
#pragma unroll
  for (int v = 0; v < kLanes; ++v) s[v] = T(0);
  int i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma unroll
    for (int v = 0; v < kLanes; ++v) s[v] += x[i + v] * y[i + v];
  }
  T r = T(0);
  for (; i < n; ++i) r += x[i] * y[i];
#pragma unroll
  for (int v = 0; v < kLanes; ++v) r += s[v];
  return r;
}

// ---------------------------------------------------------------------------------------------
// Chunked row kernels: every matrix product here is written as
//   OUT[r, c] = epilogue(bias[c] + sum_j (A1[r, j] B1[j, c] + A2[r, j] B2[j, c]))
// whose innermost loop runs over contiguous columns c of B and OUT (an axpy, no reduction), which
// is what vectorizes on the CPU and coalesces on the GPU. A work item is (MR rows, up to NV columns):
// MR * NV accumulators, each B[j, c] loaded once for MR rows (Ex::rows(): 1 on the GPU; on the CPU
// a few, which divides the traffic of B, the weights, by as much). OUT, mask and B have C columns.
// The epilogue: max(0, .) when relu; zero where mask <= 0 when mask is given (relu'(z) read off the
// post-ReLU activations).

// A[r, j] read as a[r * sar + j * saj]
template <typename T>
struct Operand {
  const T* a;
  int sar, saj;
  const T* B;
};

template <int NV, int MR, typename T>
MF_HD void combine_block(T* __restrict__ out, const T* __restrict__ mask, const T* __restrict__ bias, bool relu,
                         int C, int J, Operand<T> x1, Operand<T> x2) {
  T acc[MR][NV];
#pragma unroll
  for (int m = 0; m < MR; ++m)
#pragma unroll
    for (int v = 0; v < NV; ++v) acc[m][v] = bias == nullptr ? T(0) : bias[v];
  for (int t = 0; t < 2; ++t) {
    const Operand<T> x = t == 0 ? x1 : x2;
    if (x.a == nullptr) continue;
    for (int j = 0; j < J; ++j) {
      T s[MR];
#pragma unroll
      for (int m = 0; m < MR; ++m) s[m] = x.a[m * x.sar + j * x.saj];
      const T* __restrict__ b = x.B + static_cast<int64_t>(j) * C;
#pragma unroll
      for (int v = 0; v < NV; ++v) {
        const T bv = b[v];
#pragma unroll
        for (int m = 0; m < MR; ++m) acc[m][v] += s[m] * bv;
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MR; ++m)
#pragma unroll
    for (int v = 0; v < NV; ++v) {
      T y = acc[m][v];
      if (relu) y = relu_of(y);
      if (mask != nullptr) y = where_pos(mask[m * C + v], y);
      out[m * C + v] = y;
    }
}

// Columns [c0, c0 + nv) of MR rows in pieces of compile-time widths V, V/2, ..., 1, so that every
// inner loop has a fixed trip count (the tail of a row included).
template <int V, int MR, typename T>
MF_HD void combine_piece(T* out, const T* mask, const T* bias, bool relu, int nv, int C, int J, Operand<T> x1,
                         Operand<T> x2) {
  if (nv >= V) {
    combine_block<V, MR>(out, mask, bias, relu, C, J, x1, x2);
    nv -= V;
    if (nv == 0) return;
    out += V;
    mask = mask == nullptr ? nullptr : mask + V;
    bias = bias == nullptr ? nullptr : bias + V;
    x1.B += V;
    x2.B = x2.B == nullptr ? nullptr : x2.B + V;
  }
  if constexpr (V > 1) combine_piece<V / 2, MR>(out, mask, bias, relu, nv, C, J, x1, x2);
}

// OUT [R, C] (row-major) as above; A[r, j] is read as A[r * sar + j * saj], B[j, c] as B[j * C + c].
// A2 / B2 / mask / bias may be null.
template <typename Ex, typename T>
MF_HD void combine(const Ex& ex, T* __restrict__ out, const T* __restrict__ mask, const T* bias, bool relu, int R,
                   int C, int J, const T* A1, int sar1, int saj1, const T* B1, const T* A2, int sar2, int saj2,
                   const T* B2) {
  constexpr int V = Ex::template vec<T>();
  constexpr int MR = Ex::template rows<T>();
  const int nch = (C + V - 1) / V, nrb = (R + MR - 1) / MR;
  for (int w = ex.tid; w < nrb * nch; w += ex.nthreads) {
    const int rb = w / nch, c0 = (w - rb * nch) * V;
    const int nv = C - c0 < V ? C - c0 : V;
    // a full block of MR rows, else the last rows one at a time
    const int r0 = rb * MR, mr = R - r0 < MR ? R - r0 : MR;
    for (int r = r0; r < r0 + mr; r += (mr == MR ? MR : 1)) {
      const int64_t o = static_cast<int64_t>(r) * C + c0;
      const Operand<T> x1{A1 + static_cast<int64_t>(r) * sar1, sar1, saj1, B1 + c0};
      const Operand<T> x2{A2 == nullptr ? nullptr : A2 + static_cast<int64_t>(r) * sar2, sar2, saj2,
                          B2 == nullptr ? nullptr : B2 + c0};
      T* po = out + o;
      const T* pm = mask == nullptr ? nullptr : mask + o;
      const T* pb = bias == nullptr ? nullptr : bias + c0;
      if (mr == MR)
        combine_piece<V, MR>(po, pm, pb, relu, nv, C, J, x1, x2);
      else
        combine_piece<V, 1>(po, pm, pb, relu, nv, C, J, x1, x2);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Layer stages.

// WT_l [d_{l-1}, d_l] = W_l^T for every layer (stored at W_l's offset), so that the forward
// products are axpys over contiguous rows of WT.
template <typename Ex, typename T>
MF_HD void transpose_weights(const Ex& ex, const Plan& p, T* __restrict__ WT, const T* __restrict__ W) {
  for (int l = 1; l <= p.L; ++l) {
    const int din = p.d[l - 1], dout = p.d[l];
    const T* w = W + p.woff[l - 1];
    T* wt = WT + p.woff[l - 1];
    // (i, j) of element e = i * dout + j, advanced without a division per element
    int i = ex.tid / dout, j = ex.tid - (ex.tid / dout) * dout;
    for (int e = ex.tid; e < din * dout; e += ex.nthreads) {
      wt[e] = w[static_cast<int64_t>(j) * din + i];
      j += ex.nthreads;
      while (j >= dout) {
        j -= dout;
        ++i;
      }
    }
  }
}

// db[j] = sum_n dZ[n, j] (+ sum_n dZ2[n, j])
template <typename Ex, typename T>
MF_HD void col_sums(const Ex& ex, T* __restrict__ db, const T* dZ, int N, int dout) {
  for (int j = ex.tid; j < dout; j += ex.nthreads) {
    T s = T(0);
    for (int n = 0; n < N; ++n) s += dZ[static_cast<int64_t>(n) * dout + j];
    db[j] = s;
  }
}

// The forward of the MLP on X [N, d_0] at weights W: fills WT (W's transposed weights) and a[l]
// (post-ReLU, the logits for l = L).
template <typename Ex, typename T>
MF_HD void mlp_forward(const Ex& ex, const Plan& p, const T* W, T* WT, const T* X, int N, T* ws,
                       const int64_t* aoff) {
  transpose_weights(ex, p, WT, W);
  ex.sync();
  const T* h = X;
  for (int l = 1; l <= p.L; ++l) {
    const int din = p.d[l - 1], dout = p.d[l];
    T* a = ws + aoff[l - 1];
    // z[n, :] = b + sum_i h[n, i] WT[i, :]
    combine(ex, a, (const T*)nullptr, W + p.boff[l - 1], l < p.L, N, dout, din, h, din, 1,
            (const T*)(WT + p.woff[l - 1]), (const T*)nullptr, 0, 0, (const T*)nullptr);
    ex.sync();
    h = a;
  }
}

// Given dz[L] filled by the loss, the backward: dz[l] for l < L, and the gradient G [P] when need_g.
template <typename Ex, typename T>
MF_HD void mlp_backward(const Ex& ex, const Plan& p, const T* W, const T* X, int N, T* ws, const int64_t* aoff,
                        const int64_t* dzoff, T* G, bool need_g) {
  for (int l = p.L; l >= 1; --l) {
    const int din = p.d[l - 1], dout = p.d[l];
    const T* h = l == 1 ? X : ws + aoff[l - 2];
    const T* dz = ws + dzoff[l - 1];
    if (need_g) {
      // dW[j, i] = sum_n dz[n, j] h[n, i]: rows j of dz^T (stride 1 over j, dout over n)
      combine(ex, G + p.woff[l - 1], (const T*)nullptr, (const T*)nullptr, false, dout, din, N, dz, 1, dout, h,
              (const T*)nullptr, 0, 0, (const T*)nullptr);
      col_sums(ex, G + p.boff[l - 1], dz, N, dout);
    }
    if (l > 1) {
      // dz_{l-1}[n, i] = relu'(h[n, i]) * sum_j dz[n, j] W[j, i]
      combine(ex, ws + dzoff[l - 2], h, (const T*)nullptr, false, N, din, dout, dz, dout, 1, W + p.woff[l - 1],
              (const T*)nullptr, 0, 0, (const T*)nullptr);
    }
    ex.sync();
  }
}

// Cross-entropy of one row of logits z [C] against label; when d != null, d = gs * (softmax(z) -
// onehot(label)) and pr = softmax(z) (when pr != null).
template <typename T>
MF_HD T ce_row(const T* z, int C, int label, T* d, T* pr, T gs) {
  T m = z[0];
  for (int c = 1; c < C; ++c) m = mf_max(m, z[c]);
  T s = T(0);
  for (int c = 0; c < C; ++c) s += MF_EXP(z[c] - m);
  if (d != nullptr) {
    const T invs = T(1) / s;
    for (int c = 0; c < C; ++c) {
      const T pc = MF_EXP(z[c] - m) * invs;
      if (pr != nullptr) pr[c] = pc;
      d[c] = gs * (pc - (c == label ? T(1) : T(0)));
    }
  }
  return m + MF_LOG(s) - z[label];
}

// Sum of the cross-entropies of this thread's rows of Z [N, C] (labels y [N]), and their gradients.
template <typename Ex, typename T>
MF_HD T ce_rows(const Ex& ex, const T* Z, const int64_t* y, int N, int C, T* dz, T* prob, T gs) {
  T part = T(0);
  for (int n = ex.tid; n < N; n += ex.nthreads) {
    const int64_t o = static_cast<int64_t>(n) * C;
    part += ce_row(Z + o, C, static_cast<int>(y[n]), dz == nullptr ? nullptr : dz + o,
                   prob == nullptr ? nullptr : prob + o, gs);
  }
  return part;
}

// Loss of logits Z [N, C] against y and, when dz != null, dz = scale * d loss / d Z (and the softmax
// into prob for CE when prob != null). Returns the task loss (mean over N*C for MSE, over N for CE).
template <typename Ex, typename T>
MF_HD T loss_and_grad(const Ex& ex, int kind, const T* Z, const void* y, int N, int C, T* dz, T* prob, T scale) {
  T part = T(0);
  if (kind == kMSE) {
    const T* yy = static_cast<const T*>(y);
    const T inv = T(1) / (static_cast<T>(N) * static_cast<T>(C));
    const T gs = T(2) * inv * scale;
    for (int w = ex.tid; w < N * C; w += ex.nthreads) {
      const T diff = Z[w] - yy[w];
      part += diff * diff;
      if (dz != nullptr) dz[w] = gs * diff;
    }
    part *= inv;
  } else {
    part = ce_rows(ex, Z, static_cast<const int64_t*>(y), N, C, dz, prob, scale / static_cast<T>(N));
    part *= T(1) / static_cast<T>(N);
  }
  const T total = ex.sum(part);
  ex.sync();
  return total;
}

// HV = H_s(W) V: R-forward and R-backward of the support pass whose tape (sa, sdz, prob, and WT =
// W's transposed weights) is in ws.
template <typename Ex, typename T>
MF_HD void hvp(const Ex& ex, const Plan& p, const T* W, const T* V, const T* X, T* ws, T* HV) {
  const int N = p.Ns;
  const T* WT = ws + p.wt;
  T* VT = ws + p.vt;
  transpose_weights(ex, p, VT, V);
  ex.sync();
  // R-forward: R z_l = RW_l h_{l-1} + Rb_l + W_l R h_{l-1};  R h_l = relu'(z_l) R z_l.
  for (int l = 1; l <= p.L; ++l) {
    const int din = p.d[l - 1], dout = p.d[l];
    const T* h = l == 1 ? X : ws + p.sa[l - 2];
    const T* rh = l == 1 ? nullptr : ws + p.sra[l - 2];
    combine(ex, ws + p.sra[l - 1], l < p.L ? ws + p.sa[l - 1] : (const T*)nullptr, V + p.boff[l - 1], false, N, dout,
            din, h, din, 1, (const T*)(VT + p.woff[l - 1]), rh, din, 1, WT + p.woff[l - 1]);
    ex.sync();
  }
  // Loss: R dz_L = 2 R z_L / (N C) (MSE) or p * (R z - <p, R z>) / N (CE).
  {
    const int C = p.d[p.L];
    const T* rz = ws + p.sra[p.L - 1];
    T* rdz = ws + p.srdz[p.L - 1];
    if (p.loss_kind == kMSE) {
      const T s = T(2) / (static_cast<T>(N) * static_cast<T>(C));
      for (int w = ex.tid; w < N * C; w += ex.nthreads) rdz[w] = s * rz[w];
    } else {
      const T* prob = ws + p.prob;
      const T invn = T(1) / static_cast<T>(N);
      for (int n = ex.tid; n < N; n += ex.nthreads) {
        const int64_t o = static_cast<int64_t>(n) * C;
        const T pr = dot<Ex::kLanes>(prob + o, rz + o, C);
        for (int c = 0; c < C; ++c) rdz[o + c] = invn * prob[o + c] * (rz[o + c] - pr);
      }
    }
    ex.sync();
  }
  // R-backward: R dW_l = R dz_l^T h_{l-1} + dz_l^T R h_{l-1};  R db_l = sum_n R dz_l;
  // R dz_{l-1} = relu'(z_{l-1}) (R dz_l W_l + dz_l RW_l).
  for (int l = p.L; l >= 1; --l) {
    const int din = p.d[l - 1], dout = p.d[l];
    const T* h = l == 1 ? X : ws + p.sa[l - 2];
    const T* rh = l == 1 ? nullptr : ws + p.sra[l - 2];
    const T* dz = ws + p.sdz[l - 1];
    const T* rdz = ws + p.srdz[l - 1];
    combine(ex, HV + p.woff[l - 1], (const T*)nullptr, (const T*)nullptr, false, dout, din, N, rdz, 1, dout, h,
            rh == nullptr ? nullptr : dz,
            1, dout, rh);
    col_sums(ex, HV + p.boff[l - 1], rdz, N, dout);
    if (l > 1)
      combine(ex, ws + p.srdz[l - 2], h, (const T*)nullptr, false, N, din, dout, rdz, dout, 1, W + p.woff[l - 1], dz,
              dout, 1,
              V + p.woff[l - 1]);
    ex.sync();
  }
}

// One support forward + loss + backward at W = ws[p.w]; gradient into ws[p.g] when need_g.
template <typename Ex, typename T>
MF_HD T support_pass(const Ex& ex, const Plan& p, const T* sx, const void* sy, T* ws, bool need_g, bool need_prob) {
  const T* W = ws + p.w;
  mlp_forward(ex, p, W, ws + p.wt, sx, p.Ns, ws, p.sa);
  const T loss = loss_and_grad(ex, p.loss_kind, ws + p.sa[p.L - 1], sy, p.Ns, p.d[p.L], ws + p.sdz[p.L - 1],
                               need_prob ? ws + p.prob : (T*)nullptr, T(1));
  mlp_backward(ex, p, W, sx, p.Ns, ws, p.sa, p.sdz, ws + p.g, need_g);
  return loss;
}

template <typename Ex, typename T>
MF_HD void copy(const Ex& ex, T* __restrict__ dst, const T* __restrict__ src, int64_t n) {
  for (int64_t i = ex.tid; i < n; i += ex.nthreads) dst[i] = src[i];
}

// dst = W - lr * G  (lr per parameter, or the scalar lr_k)
template <typename Ex, typename T>
MF_HD void sgd_step(const Ex& ex, const Plan& p, T* dst, const T* W, const T* G, const T* lr, int k) {
  if (p.lr_per_param) {
    for (int64_t i = ex.tid; i < p.P; i += ex.nthreads) dst[i] = W[i] - lr[i] * G[i];
  } else {
    const T a = lr[k];
    for (int64_t i = ex.tid; i < p.P; i += ex.nthreads) dst[i] = W[i] - a * G[i];
  }
}

// (workspace offset, saved offset, length) of the i-th piece of the last inner step's tape: its
// gradient G (Meta-SGD only), then per layer the support activations and loss gradients, then the CE softmax.
// Returns false past the last piece.
MF_HD bool tape_piece(const Plan& p, int i, int64_t& wo, int64_t& so, int64_t& n) {
  if (!p.lr_per_param) ++i;  // no G
  if (i == 0) {
    wo = p.g, so = p.tg, n = p.P;
    return true;
  }
  const int l = (i - 1) / 2 + 1;
  if (l <= p.L) {
    const bool dz = (i - 1) % 2 == 1;
    wo = dz ? p.sdz[l - 1] : p.sa[l - 1];
    so = dz ? p.tsdz[l - 1] : p.tsa[l - 1];
    n = static_cast<int64_t>(p.Ns) * p.d[l];
    return true;
  }
  if (i == 2 * p.L + 1 && p.loss_kind == kCE) {
    wo = p.prob, so = p.tprob, n = static_cast<int64_t>(p.Ns) * p.d[p.L];
    return true;
  }
  return false;
}

template <typename Ex, typename T>
MF_HD void save_tape(const Ex& ex, const Plan& p, const T* ws, T* saved) {
  int64_t wo, so, n;
  for (int i = 0; tape_piece(p, i, wo, so, n); ++i) copy(ex, saved + so, ws + wo, n);
}

template <typename Ex, typename T>
MF_HD void load_tape(const Ex& ex, const Plan& p, T* ws, const T* saved) {
  int64_t wo, so, n;
  for (int i = 0; tape_piece(p, i, wo, so, n); ++i) copy(ex, ws + wo, saved + so, n);
}

// Per-task inputs and outputs of the forward (t-th slices; outputs may be null when not wanted).
template <typename T>
struct FwdTask {
  const T* theta;   // [P]
  const T* lr;      // [K] or [P]
  const T* sx;      // [Ns, d0]
  const void* sy;   // [Ns, dL] T or [Ns] int64
  const T* qx;
  const void* qy;
  T* query_loss;    // scalar
  T* support_loss;  // scalar
  T* fast;          // [P]
  T* query_out;     // [Nq, dL]
  T* saved;         // [saved_size] (the trajectory and the last step's tape, see Plan), or null
};

template <typename Ex, typename T>
MF_HD void forward_task(const Ex& ex, const Plan& p, const FwdTask<T>& a, T* ws) {
  T* W = ws + p.w;
  copy(ex, W, a.theta, p.P);
  ex.sync();
  T sl = T(0);
  const bool save = a.saved != nullptr;
  for (int k = 0; k < p.K; ++k) {
    const bool last = k == p.K - 1;
    if (save && k > 0) copy(ex, a.saved + static_cast<int64_t>(k - 1) * p.P, (const T*)W, p.P);
    sl = support_pass(ex, p, a.sx, a.sy, ws, true, save && last && p.loss_kind == kCE);
    if (save && last) save_tape(ex, p, (const T*)ws, a.saved);  // each thread its own indices
    sgd_step(ex, p, W, W, ws + p.g, a.lr, k);  // elementwise: in place is safe
    ex.sync();
  }
  mlp_forward(ex, p, (const T*)W, ws + p.hv, a.qx, p.Nq, ws, p.qa);
  const int C = p.d[p.L];
  // When saving, the query gradient too (unscaled: the backward multiplies it by grad_query_loss)
  const T ql = loss_and_grad(ex, p.loss_kind, ws + p.qa[p.L - 1], a.qy, p.Nq, C,
                             save ? ws + p.qdz[p.L - 1] : (T*)nullptr, (T*)nullptr, T(1));
  if (save) mlp_backward(ex, p, (const T*)W, a.qx, p.Nq, ws, p.qa, p.qdz, a.saved + p.tgq, true);
  if (a.fast != nullptr) copy(ex, a.fast, (const T*)W, p.P);
  if (a.query_out != nullptr) copy(ex, a.query_out, (const T*)(ws + p.qa[p.L - 1]), static_cast<int64_t>(p.Nq) * C);
  if (ex.tid == 0) {
    *a.query_loss = ql;
    *a.support_loss = sl;
  }
}

template <typename T>
struct BwdTask {
  T gq;             // grad_query_loss[t]
  const T* theta;   // [P] (W_0)
  const T* lr;
  const T* sx;
  const void* sy;
  const T* saved;   // [saved_size], as the forward saved it (the query set's part included)
  T* grad_theta;    // [P] (this task's Wbar_0)
  T* grad_lr;       // [P] (this task's share) or null
};

// W_k of the inner loop: theta for k = 0, then as the forward saved it
template <typename T>
MF_HD const T* trajectory(const Plan& p, const BwdTask<T>& a, int k) {
  return k == 0 ? a.theta : a.saved + static_cast<int64_t>(k - 1) * p.P;
}

template <typename Ex, typename T>
MF_HD void backward_task(const Ex& ex, const Plan& p, const BwdTask<T>& a, bool first_order, T* ws) {
  T* W = ws + p.w;
  T* G = ws + p.g;
  T* Wq = ws + p.wq;
  T* Wbar = ws + p.wbar;
  T* HV = ws + p.hv;
  const int K = p.K;
  const bool ce_prob = p.loss_kind == kCE && !first_order;
  // The last inner step's W and tape (with its gradient for Meta-SGD), and Wbar_K = gq * grad L_q(W_K), as saved.
  copy(ex, W, trajectory(p, a, K - 1), p.P);
  load_tape(ex, p, ws, a.saved);
  for (int64_t i = ex.tid; i < p.P; i += ex.nthreads) Wbar[i] = a.gq * a.saved[p.tgq + i];
  ex.sync();
  transpose_weights(ex, p, ws + p.wt, (const T*)W);  // the hvp reads W's transposed weights
  ex.sync();
  for (int k = K - 1; k >= 0; --k) {
    const bool need_tape = !first_order || p.lr_per_param;
    if (k < K - 1 && need_tape) {
      copy(ex, W, trajectory(p, a, k), p.P);
      ex.sync();
      support_pass(ex, p, a.sx, a.sy, ws, p.lr_per_param, ce_prob);
    }
    if (p.lr_per_param) {
      // each thread touches only its own indices here and below, so no barrier between them
      if (k == K - 1)
        for (int64_t i = ex.tid; i < p.P; i += ex.nthreads) a.grad_lr[i] = -Wbar[i] * G[i];
      else
        for (int64_t i = ex.tid; i < p.P; i += ex.nthreads) a.grad_lr[i] -= Wbar[i] * G[i];
    }
    if (!first_order) {
      T* V = Wq;  // free after the query pass
      if (p.lr_per_param) {
        for (int64_t i = ex.tid; i < p.P; i += ex.nthreads) V[i] = a.lr[i] * Wbar[i];
      } else {
        const T s = a.lr[k];
        for (int64_t i = ex.tid; i < p.P; i += ex.nthreads) V[i] = s * Wbar[i];
      }
      ex.sync();
      hvp(ex, p, (const T*)W, (const T*)V, a.sx, ws, HV);
      for (int64_t i = ex.tid; i < p.P; i += ex.nthreads) Wbar[i] -= HV[i];
      ex.sync();
    }
  }
  copy(ex, a.grad_theta, (const T*)Wbar, p.P);
}

}  // namespace fused_inner_loop
}  // namespace metafast

// ---------------------------------------------------------------------------------------------
// Launchers (host). The op functions in fused_inner_loop_cpu.cpp check the arguments, allocate the
// outputs and call these for the tensors' device. Tensors are contiguous (on the CPU, sx / sy / qx /
// qy only per task slice: any task stride), of one floating dtype (labels int64); saved holds
// saved_size elements per task (CUDA: [T, saved_size]; CPU: per task group, lane-interleaved);
// grad_query_loss is [T], or [1] for the same value for every task.
#include <ATen/core/Tensor.h>

namespace metafast {
namespace fused_inner_loop {

void forward_cpu(const Plan& p, const at::Tensor& theta, const at::Tensor& lr, const at::Tensor& sx,
                 const at::Tensor& sy, const at::Tensor& qx, const at::Tensor& qy, const at::Tensor& query_loss,
                 const at::Tensor& support_loss, const at::Tensor& fast, const at::Tensor& query_out,
                 const at::Tensor& saved);
void backward_cpu(const Plan& p, const at::Tensor& grad_query_loss, const at::Tensor& theta, const at::Tensor& lr,
                  const at::Tensor& sx, const at::Tensor& sy, const at::Tensor& saved,
                  const at::Tensor& grad_theta_t, const at::Tensor& grad_lr_t, bool first_order);
void forward_cuda(const Plan& p, const at::Tensor& theta, const at::Tensor& lr, const at::Tensor& sx,
                  const at::Tensor& sy, const at::Tensor& qx, const at::Tensor& qy, const at::Tensor& query_loss,
                  const at::Tensor& support_loss, const at::Tensor& fast, const at::Tensor& query_out,
                  const at::Tensor& saved);
void backward_cuda(const Plan& p, const at::Tensor& grad_query_loss, const at::Tensor& theta, const at::Tensor& lr,
                   const at::Tensor& sx, const at::Tensor& sy, const at::Tensor& saved,
                   const at::Tensor& grad_theta_t, const at::Tensor& grad_lr_t, bool first_order);

}  // namespace fused_inner_loop
}  // namespace metafast
