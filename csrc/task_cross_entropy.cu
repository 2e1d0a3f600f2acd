// CUDA kernels behind metafast::task_cross_entropy (metafast/ops/task_cross_entropy.py): per-row
// softmax cross-entropy fused with its gradient, and the softmax Jacobian-vector product used by its
// double backward. Same math and argument conventions as kernels/task_cross_entropy.py.
//
// Work split: a group of TPR threads owns one row (TPR <= 32: several rows per 256-thread block,
// reduced with warp shuffles; TPR > 32: one row per block, reduced through shared memory). Rows up to
// TPR * VPT classes are held in registers and read from memory once; longer rows are swept twice
// (online softmax, then the gradient), so registers stay bounded for any C.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "checks.h"
#include "online_softmax.cuh"

namespace metafast {
namespace task_cross_entropy {

using softmax::acc_dtype;
using softmax::block_threads;
using softmax::exp_;
using softmax::group_max_sum;
using softmax::group_sum;
using softmax::Int;
using softmax::log_;
using softmax::neg_big;
using softmax::push;

// Math (one row x in R^C, label y, smoothing eps, row weight w):
//   target   q_c = (1 - eps) [c == y] + eps / C
//   lse      = log sum_c exp(x_c)
//   loss     = -sum_c q_c log softmax(x)_c = lse - (1 - eps) x_y - (eps / C) sum_c x_c
//   dloss/dx = softmax(x) - q
// Stored: row_loss = w * loss, dlogits = w * (softmax(x) - q), lse. w = 1/n_valid(task) for "mean",
// 1 for "sum"/"none", 0 on ignored rows. A label outside [0, C) that is not ignore_index is never
// dereferenced: its row gets NaN loss and gradient.
template <typename scalar_t, typename acc_t, int TPR, int VPT>
__global__ void __launch_bounds__(block_threads(TPR)) fwd_kernel(
    const scalar_t* __restrict__ logits,   // [T, N, C], strides sxt, sxn, sxc
    const int64_t* __restrict__ labels,    // [T, N], strides syt, syn
    const acc_t* __restrict__ row_weight,  // [T, N] contiguous: w
    acc_t* __restrict__ row_loss,          // [T, N] contiguous, out: w * loss
    scalar_t* __restrict__ dlogits,        // [T, N, C] contiguous, out: w * (softmax - q)
    acc_t* __restrict__ lse_out,           // [T, N] contiguous, out: logsumexp of the row
    int64_t sxt, int64_t sxn, int64_t sxc,  // logits strides
    int64_t syt, int64_t syn,               // labels strides
    int64_t R, int64_t N, int64_t C,        // rows (T * N), rows per task, classes
    int64_t ignore_index,                   // label whose row is skipped
    acc_t eps) {                            // label smoothing in [0, 1)
  constexpr int ROWS = block_threads(TPR) / TPR;
  __shared__ acc_t smem[64];
  const int lane = threadIdx.x % TPR;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * ROWS + threadIdx.x / TPR;
  // No early return for rows past the end: every thread takes part in the group reductions.
  const bool row_ok = row < R;
  const int64_t t = row / N, n = row % N;
  const scalar_t* x = logits + t * sxt + n * sxn;
  const int64_t y = row_ok ? labels[t * syt + n * syn] : ignore_index;
  const bool valid = row_ok && y != ignore_index;
  const bool hit = valid && y >= 0 && y < C;
  acc_t w = row_ok ? row_weight[row] : acc_t(0);
  if (valid && !hit) w = acc_t(NAN);

  acc_t m = neg_big<acc_t>(), s = 0, sum_x = 0;
  acc_t cache[VPT > 0 ? VPT : 1];
  if constexpr (VPT > 0) {
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int64_t c = lane + static_cast<int64_t>(i) * TPR;
      acc_t v = -INFINITY;
      if (row_ok && c < C) {
        v = static_cast<acc_t>(x[c * sxc]);
        sum_x += v;
      }
      cache[i] = v;
      push(m, s, v);
    }
  } else {
    for (int64_t c = lane; row_ok && c < C; c += TPR) {
      const acc_t v = static_cast<acc_t>(x[c * sxc]);
      sum_x += v;
      push(m, s, v);
    }
  }
  group_max_sum<TPR>(m, s, smem);
  if (eps != acc_t(0)) sum_x = group_sum<TPR>(sum_x, smem);  // eps is uniform: no divergence
  const acc_t lse = m + log_(s);

  if (lane == 0 && row_ok) {
    acc_t loss = 0;
    if (valid) {
      const acc_t xy = hit ? static_cast<acc_t>(x[y * sxc]) : acc_t(0);
      loss = lse - (acc_t(1) - eps) * xy;
      if (eps != acc_t(0)) loss -= eps / static_cast<acc_t>(C) * sum_x;  // avoids 0 * inf
      loss *= w;
    }
    row_loss[row] = loss;
    lse_out[row] = lse;
  }

  if (!valid) w = 0;
  const acc_t on = acc_t(1) - eps, off = eps / static_cast<acc_t>(C);
  scalar_t* d = dlogits + row * C;
  if constexpr (VPT > 0) {
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int64_t c = lane + static_cast<int64_t>(i) * TPR;
      if (row_ok && c < C) {
        const acc_t q = (c == y ? on : acc_t(0)) + off;
        d[c] = static_cast<scalar_t>(w * (exp_(cache[i] - lse) - q));
      }
    }
  } else {
    for (int64_t c = lane; row_ok && c < C; c += TPR) {
      const acc_t q = (c == y ? on : acc_t(0)) + off;
      d[c] = static_cast<scalar_t>(w * (exp_(static_cast<acc_t>(x[c * sxc]) - lse) - q));
    }
  }
}

// Math: dlogits = w (p - q) with p = softmax(x), so d(dlogits)/dx = w (diag(p) - p p^T), symmetric;
// q is constant. For v in R^C and a row scale s:
//   out = s * (diag(p) - p p^T) v = s * p * (v - <p, v>),   p = exp(x - lse) from the forward's lse.
template <typename scalar_t, typename acc_t, int TPR, int VPT>
__global__ void __launch_bounds__(block_threads(TPR)) jvp_kernel(
    const scalar_t* __restrict__ logits,  // [T, N, C], strides sxt, sxn, sxc
    const acc_t* __restrict__ lse,        // [T, N] contiguous: logsumexp from the forward
    const scalar_t* __restrict__ v,       // [T, N, C], strides svt, svn, svc
    const acc_t* __restrict__ scale,      // [T, N] contiguous: row scale s
    scalar_t* __restrict__ out,           // [T, N, C] contiguous, out
    int64_t sxt, int64_t sxn, int64_t sxc,  // logits strides
    int64_t svt, int64_t svn, int64_t svc,  // v strides
    int64_t R, int64_t N, int64_t C) {      // rows (T * N), rows per task, classes
  constexpr int ROWS = block_threads(TPR) / TPR;
  __shared__ acc_t smem[64];
  const int lane = threadIdx.x % TPR;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * ROWS + threadIdx.x / TPR;
  const bool row_ok = row < R;
  const int64_t t = row / N, n = row % N;
  const scalar_t* x = logits + t * sxt + n * sxn;
  const scalar_t* vr = v + t * svt + n * svn;
  const acc_t l = row_ok ? lse[row] : acc_t(0);
  const acc_t sc = row_ok ? scale[row] : acc_t(0);

  acc_t dot = 0;
  acc_t pc[VPT > 0 ? VPT : 1], vc[VPT > 0 ? VPT : 1];
  if constexpr (VPT > 0) {
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int64_t c = lane + static_cast<int64_t>(i) * TPR;
      acc_t p = 0, vv = 0;
      if (row_ok && c < C) {
        p = exp_(static_cast<acc_t>(x[c * sxc]) - l);
        vv = static_cast<acc_t>(vr[c * svc]);
      }
      pc[i] = p;
      vc[i] = vv;
      dot += p * vv;
    }
  } else {
    for (int64_t c = lane; row_ok && c < C; c += TPR)
      dot += exp_(static_cast<acc_t>(x[c * sxc]) - l) * static_cast<acc_t>(vr[c * svc]);
  }
  dot = group_sum<TPR>(dot, smem);

  scalar_t* o = out + row * C;
  if constexpr (VPT > 0) {
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int64_t c = lane + static_cast<int64_t>(i) * TPR;
      if (row_ok && c < C) o[c] = static_cast<scalar_t>(sc * pc[i] * (vc[i] - dot));
    }
  } else {
    for (int64_t c = lane; row_ok && c < C; c += TPR) {
      const acc_t p = exp_(static_cast<acc_t>(x[c * sxc]) - l);
      o[c] = static_cast<scalar_t>(sc * p * (static_cast<acc_t>(vr[c * svc]) - dot));
    }
  }
}

// Threads per row and values cached per thread for C classes; VPT 0 = two sweeps over memory.
template <typename F>
void with_config(int64_t C, F&& f) {
  if (C <= 4) f(Int<1>{}, Int<4>{});
  else if (C <= 8) f(Int<2>{}, Int<4>{});
  else if (C <= 16) f(Int<4>{}, Int<4>{});
  else if (C <= 32) f(Int<8>{}, Int<4>{});
  else if (C <= 64) f(Int<16>{}, Int<4>{});
  else if (C <= 128) f(Int<32>{}, Int<4>{});
  else if (C <= 256) f(Int<32>{}, Int<8>{});
  else if (C <= 512) f(Int<32>{}, Int<16>{});
  else if (C <= 1024) f(Int<32>{}, Int<32>{});
  else if (C <= 2048) f(Int<256>{}, Int<8>{});
  else if (C <= 4096) f(Int<512>{}, Int<8>{});
  else f(Int<512>{}, Int<0>{});
}

void check_logits(const at::Tensor& logits) {
  CHECK_CUDA(logits);
  CHECK_FLOATING(logits);
  CHECK_DIM(logits, 3);
  TORCH_CHECK(logits.size(2) >= 1, "logits must have at least one class, got shape ", logits.sizes());
}

void check_rows(const at::Tensor& x, const at::Tensor& logits, const char* name) {
  TORCH_CHECK(x.is_cuda() && x.device() == logits.device(), name, " must be on ", logits.device(),
              " like logits, got ", x.device());
  TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(x.scalar_type() == acc_dtype(logits.scalar_type()), name, " must have dtype ",
              acc_dtype(logits.scalar_type()), " for ", logits.scalar_type(), " logits, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.size(0) == logits.size(0) && x.size(1) == logits.size(1), name,
              " must have shape [T, N] = [", logits.size(0), ", ", logits.size(1), "], got ", x.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd(const at::Tensor& logits, const at::Tensor& labels,
                                                   const at::Tensor& row_weight, double label_smoothing,
                                                   int64_t ignore_index) {
  check_logits(logits);
  CHECK_CUDA(labels);
  CHECK_SAME_DEVICE(labels, logits);
  CHECK_DTYPE(labels, at::kLong);
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == logits.size(0) && labels.size(1) == logits.size(1),
              "labels must have shape [T, N] = [", logits.size(0), ", ", logits.size(1), "], got ",
              labels.sizes());
  check_rows(row_weight, logits, "row_weight");
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing < 1.0,
              "label_smoothing must be in [0, 1), got ", label_smoothing);

  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t T = logits.size(0), N = logits.size(1), C = logits.size(2), R = T * N;
  auto acc_opts = logits.options().dtype(acc_dtype(logits.scalar_type()));
  at::Tensor row_loss = at::empty({T, N}, acc_opts);
  at::Tensor lse = at::empty({T, N}, acc_opts);
  at::Tensor dlogits = at::empty({T, N, C}, logits.options());
  if (R == 0) return {row_loss, dlogits, lse};

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "task_cross_entropy_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_config(C, [&](auto tpr, auto vpt) {
      constexpr int TPR = decltype(tpr)::value, VPT = decltype(vpt)::value;
      constexpr int ROWS = block_threads(TPR) / TPR;
      const int64_t blocks = (R + ROWS - 1) / ROWS;
      fwd_kernel<scalar_t, acc_t, TPR, VPT><<<static_cast<unsigned>(blocks), block_threads(TPR), 0, stream>>>(
          logits.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(), row_weight.data_ptr<acc_t>(),
          row_loss.data_ptr<acc_t>(), dlogits.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(),
          logits.stride(0), logits.stride(1), logits.stride(2), labels.stride(0), labels.stride(1), R, N, C,
          ignore_index, static_cast<acc_t>(label_smoothing));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {row_loss, dlogits, lse};
}

at::Tensor softmax_jvp(const at::Tensor& logits, const at::Tensor& lse, const at::Tensor& v,
                       const at::Tensor& row_scale) {
  check_logits(logits);
  check_rows(lse, logits, "lse");
  check_rows(row_scale, logits, "row_scale");
  CHECK_CUDA(v);
  CHECK_SAME_DEVICE(v, logits);
  TORCH_CHECK(v.sizes() == logits.sizes(), "v must have the shape of logits ", logits.sizes(), ", got ",
              v.sizes());
  TORCH_CHECK(v.scalar_type() == logits.scalar_type(), "v must have dtype ", logits.scalar_type(),
              " like logits, got ", v.scalar_type());

  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t T = logits.size(0), N = logits.size(1), C = logits.size(2), R = T * N;
  at::Tensor out = at::empty({T, N, C}, logits.options());
  if (R == 0) return out;

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "task_cross_entropy_softmax_jvp_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_config(C, [&](auto tpr, auto vpt) {
      constexpr int TPR = decltype(tpr)::value, VPT = decltype(vpt)::value;
      constexpr int ROWS = block_threads(TPR) / TPR;
      const int64_t blocks = (R + ROWS - 1) / ROWS;
      jvp_kernel<scalar_t, acc_t, TPR, VPT><<<static_cast<unsigned>(blocks), block_threads(TPR), 0, stream>>>(
          logits.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(), v.data_ptr<scalar_t>(), row_scale.data_ptr<acc_t>(),
          out.data_ptr<scalar_t>(), logits.stride(0), logits.stride(1), logits.stride(2), v.stride(0), v.stride(1),
          v.stride(2), R, N, C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace task_cross_entropy
}  // namespace metafast

TORCH_LIBRARY_FRAGMENT(metafast, m) {
  // (row_loss [T, N] = w * loss, dlogits [T, N, C] = w * (softmax - target), lse [T, N]); row_weight w
  // and the float outputs are float32 (float64 for float64 logits). Labels outside [0, C) that are
  // not ignore_index give NaN rows.
  m.def(
      "task_cross_entropy_fwd_cuda(Tensor logits, Tensor labels, Tensor row_weight, float label_smoothing, "
      "int ignore_index) -> (Tensor, Tensor, Tensor)");
  // row_scale * p * (v - <p, v>) per row with p = exp(logits - lse).
  m.def("task_cross_entropy_softmax_jvp_cuda(Tensor logits, Tensor lse, Tensor v, Tensor row_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(metafast, CUDA, m) {
  m.impl("task_cross_entropy_fwd_cuda", &metafast::task_cross_entropy::fwd);
  m.impl("task_cross_entropy_softmax_jvp_cuda", &metafast::task_cross_entropy::softmax_jvp);
}
