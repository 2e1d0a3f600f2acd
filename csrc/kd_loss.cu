// CUDA kernel behind metafast::kd_loss (metafast/ops/kd_loss.py): the knowledge-distillation loss of
// each row fused with its gradient w.r.t. the student logits. Same math and argument conventions as
// kernels/kd_loss.py.
//
// Work split: a group of TPR threads owns one row (TPR = 32: eight rows per 256-thread block, reduced
// with warp shuffles; TPR > 32: one row per block, reduced through shared memory). Rows up to
// TPR * VPT classes are held in registers and read from memory once; longer rows are swept twice
// (three online softmaxes, then KL and the gradient), so registers stay bounded for any C.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "checks.h"
#include "online_softmax.cuh"

namespace metafast {
namespace kd_loss {

using softmax::acc_dtype;
using softmax::block_threads;
using softmax::exp_;
using softmax::group_max_sum;
using softmax::group_sum;
using softmax::Int;
using softmax::log_;
using softmax::neg_big;
using softmax::push;

// Math (one row: student s, teacher t, temperature T, label y):
//   a = s / T, b = t / T, p = softmax(a), r = softmax(b), q = softmax(s)
//   KL(r || p) = sum_c r_c ((b_c - lse_b) - (a_c - lse_a))       (classes with r_c = 0 add nothing)
//   loss       = c_kl KL + c_ce (lse(s) - s_y)
//   dloss/ds   = c_kd (p - r) + c_ce (q - onehot(y))
// with c_kl = w alpha T^2, c_kd = w alpha T, c_ce = w (1 - alpha) (0 without a target) and w = 1/N for
// "mean", else 1. A label outside [0, C) is never dereferenced: its row gets NaN loss and gradient.
template <typename scalar_t, typename acc_t, int TPR, int VPT>
__global__ void __launch_bounds__(block_threads(TPR)) fwd_kernel(
    const scalar_t* __restrict__ student,  // [T, N, C], strides sst, ssn, ssc
    const scalar_t* __restrict__ teacher,  // [T, N, C], strides stt, stn, stc
    const int64_t* __restrict__ labels,    // [T, N], strides syt, syn; nullptr: no CE term
    acc_t* __restrict__ row_loss,          // [T, N] contiguous, out
    scalar_t* __restrict__ grad,           // [T, N, C] contiguous, out: dloss/dstudent
    int64_t sst, int64_t ssn, int64_t ssc,  // student strides
    int64_t stt, int64_t stn, int64_t stc,  // teacher strides
    int64_t syt, int64_t syn,               // labels strides
    int64_t R, int64_t N, int64_t C,        // rows (T * N), rows per task, classes
    acc_t inv_t, acc_t c_kl, acc_t c_kd, acc_t c_ce) {  // 1/T and the folded coefficients
  constexpr int ROWS = block_threads(TPR) / TPR;
  __shared__ acc_t smem[64];
  const int lane = threadIdx.x % TPR;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * ROWS + threadIdx.x / TPR;
  // No early return for rows past the end: every thread takes part in the group reductions.
  const bool row_ok = row < R;
  const int64_t ti = row / N, ni = row % N;
  const scalar_t* s = student + ti * sst + ni * ssn;
  const scalar_t* t = teacher + ti * stt + ni * stn;
  const bool has_target = labels != nullptr;  // uniform across the grid: no divergence
  const int64_t y = (has_target && row_ok) ? labels[ti * syt + ni * syn] : int64_t(-1);

  acc_t m_a = neg_big<acc_t>(), z_a = 0, m_b = neg_big<acc_t>(), z_b = 0, m_s = neg_big<acc_t>(), z_s = 0;
  acc_t cs[VPT > 0 ? VPT : 1], ct[VPT > 0 ? VPT : 1];
  if constexpr (VPT > 0) {
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int64_t c = lane + static_cast<int64_t>(i) * TPR;
      acc_t sv = -INFINITY, tv = -INFINITY;
      if (row_ok && c < C) {
        sv = static_cast<acc_t>(s[c * ssc]);
        tv = static_cast<acc_t>(t[c * stc]);
      }
      cs[i] = sv;
      ct[i] = tv;
      push(m_a, z_a, sv * inv_t);
      push(m_b, z_b, tv * inv_t);
      if (has_target) push(m_s, z_s, sv);
    }
  } else {
    for (int64_t c = lane; row_ok && c < C; c += TPR) {
      const acc_t sv = static_cast<acc_t>(s[c * ssc]);
      push(m_a, z_a, sv * inv_t);
      push(m_b, z_b, static_cast<acc_t>(t[c * stc]) * inv_t);
      if (has_target) push(m_s, z_s, sv);
    }
  }
  group_max_sum<TPR>(m_a, z_a, smem);
  group_max_sum<TPR>(m_b, z_b, smem);
  if (has_target) group_max_sum<TPR>(m_s, z_s, smem);
  const acc_t lse_a = m_a + log_(z_a), lse_b = m_b + log_(z_b), lse_s = m_s + log_(z_s);

  // KL and the gradient: from registers, or a second sweep over memory.
  acc_t kl = 0;
  scalar_t* g = grad + row * C;
  auto emit = [&](int64_t c, acc_t sv, acc_t tv) {
    const acc_t la = sv * inv_t - lse_a, lb = tv * inv_t - lse_b;  // log p, log r
    const acc_t r = exp_(lb);
    if (r > acc_t(0)) kl += r * (lb - la);
    acc_t d = c_kd * (exp_(la) - r);
    if (has_target) d += c_ce * (exp_(sv - lse_s) - (c == y ? acc_t(1) : acc_t(0)));
    g[c] = static_cast<scalar_t>(d);
  };
  if constexpr (VPT > 0) {
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int64_t c = lane + static_cast<int64_t>(i) * TPR;
      if (row_ok && c < C) emit(c, cs[i], ct[i]);
    }
  } else {
    for (int64_t c = lane; row_ok && c < C; c += TPR)
      emit(c, static_cast<acc_t>(s[c * ssc]), static_cast<acc_t>(t[c * stc]));
  }
  kl = group_sum<TPR>(kl, smem);

  if (lane == 0 && row_ok) {
    acc_t loss = c_kl * kl;
    if (has_target) {
      const bool hit = y >= 0 && y < C;
      loss += hit ? c_ce * (lse_s - static_cast<acc_t>(s[y * ssc])) : acc_t(NAN);
    }
    row_loss[row] = loss;
  }
  // An out-of-range label poisons the whole row's gradient, as in the Triton kernel.
  if (has_target && row_ok && !(y >= 0 && y < C)) {
    for (int64_t c = lane; c < C; c += TPR) g[c] = static_cast<scalar_t>(NAN);
  }
}

// Threads per row and values cached per thread for C classes; VPT 0 = two sweeps over memory.
template <typename F>
void with_config(int64_t C, F&& f) {
  if (C <= 128) f(Int<32>{}, Int<4>{});
  else if (C <= 512) f(Int<32>{}, Int<16>{});
  else if (C <= 2048) f(Int<256>{}, Int<8>{});
  else if (C <= 4096) f(Int<512>{}, Int<8>{});
  else f(Int<512>{}, Int<0>{});
}

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& student, const at::Tensor& teacher,
                                       const std::optional<at::Tensor>& target, double inv_t, double c_kl,
                                       double c_kd, double c_ce) {
  CHECK_CUDA(student);
  CHECK_FLOATING(student);
  CHECK_DIM(student, 3);
  TORCH_CHECK(student.size(2) >= 1, "student must have at least one class, got shape ", student.sizes());
  CHECK_CUDA(teacher);
  CHECK_SAME_DEVICE(teacher, student);
  TORCH_CHECK(teacher.sizes() == student.sizes(), "teacher must have the shape of student ", student.sizes(),
              ", got ", teacher.sizes());
  CHECK_DTYPE(teacher, student.scalar_type());
  const int64_t T = student.size(0), N = student.size(1), C = student.size(2), R = T * N;
  const int64_t* labels_ptr = nullptr;
  int64_t syt = 0, syn = 0;
  if (target.has_value()) {
    const at::Tensor& labels = *target;
    CHECK_CUDA(labels);
    CHECK_SAME_DEVICE(labels, student);
    CHECK_DTYPE(labels, at::kLong);
    TORCH_CHECK(labels.dim() == 2 && labels.size(0) == T && labels.size(1) == N, "target must have shape [T, N] = [",
                T, ", ", N, "], got ", labels.sizes());
    labels_ptr = labels.data_ptr<int64_t>();
    syt = labels.stride(0);
    syn = labels.stride(1);
  }
  TORCH_CHECK(inv_t > 0.0, "inv_t must be > 0, got ", inv_t);

  const c10::cuda::CUDAGuard guard(student.device());
  at::Tensor row_loss = at::empty({T, N}, student.options().dtype(acc_dtype(student.scalar_type())));
  at::Tensor grad = at::empty({T, N, C}, student.options());
  if (R == 0) return {row_loss, grad};

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_loss_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_config(C, [&](auto tpr, auto vpt) {
      constexpr int TPR = decltype(tpr)::value, VPT = decltype(vpt)::value;
      constexpr int ROWS = block_threads(TPR) / TPR;
      const int64_t blocks = (R + ROWS - 1) / ROWS;
      fwd_kernel<scalar_t, acc_t, TPR, VPT><<<static_cast<unsigned>(blocks), block_threads(TPR), 0, stream>>>(
          student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(), labels_ptr, row_loss.data_ptr<acc_t>(),
          grad.data_ptr<scalar_t>(), student.stride(0), student.stride(1), student.stride(2), teacher.stride(0),
          teacher.stride(1), teacher.stride(2), syt, syn, R, N, C, static_cast<acc_t>(inv_t),
          static_cast<acc_t>(c_kl), static_cast<acc_t>(c_kd), static_cast<acc_t>(c_ce));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {row_loss, grad};
}

}  // namespace kd_loss
}  // namespace metafast

TORCH_LIBRARY_FRAGMENT(metafast, m) {
  // (row_loss [T, N], grad [T, N, C] = d sum(row_loss) / d student) for row_loss = c_kl KL(softmax(
  // teacher * inv_t) || softmax(student * inv_t)) + c_ce CE(student, target); grad = c_kd (p - r) +
  // c_ce (softmax(student) - onehot). row_loss is float32 (float64 for float64 logits). A target
  // outside [0, C) gives a NaN row.
  m.def(
      "kd_loss_fwd_cuda(Tensor student, Tensor teacher, Tensor? target, float inv_t, float c_kl, float c_kd, "
      "float c_ce) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(metafast, CUDA, m) { m.impl("kd_loss_fwd_cuda", &metafast::kd_loss::fwd); }
