// CUDA side of metafast::multitask_heads_cross_entropy (metafast/ops/multitask_heads.py): the logits of
// all H heads from cuBLAS (one batched GEMM, or one GEMM over all heads' classes when the features are
// shared; the bias enters as the GEMM's C), then one kernel computing every row's softmax
// cross-entropy and its gradient w.r.t. the logits. The matmul is deliberately not hand-fused: cuBLAS
// runs it near peak, and the cross-entropy kernel reads each logits row once.
//
// Work split of the cross-entropy kernel: one warp per row; rows up to 32 * VPT classes are held in
// registers (read once), longer rows are swept twice (online softmax, then the gradient).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "checks.h"
#include "online_softmax.cuh"

namespace metafast {
namespace multitask_heads {

constexpr int kWarpsPerBlock = 8;

using softmax::acc_dtype;
using softmax::exp_;
using softmax::log_;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Math (row z in R^O of head h, label y, row weight w = 1/N for "mean", 1 for "sum"):
//   lse = log sum_o exp(z_o);  loss = lse - z_y;  d loss / d z = softmax(z) - onehot(y)
// Stored: row_loss = w * loss, dlogits = w * (softmax(z) - onehot(y)). A label outside [0, O) is never
// dereferenced: its row gets NaN loss and gradient.
template <typename scalar_t, typename acc_t, int VPT>
__global__ void ce_kernel(const scalar_t* __restrict__ logits,  // [H, N, O], strides below
                          const int64_t* __restrict__ labels,   // [H, N], strides below
                          acc_t* __restrict__ row_loss,         // [H, N] contiguous, out
                          scalar_t* __restrict__ dlogits,       // [H, N, O] contiguous, out
                          int64_t szh, int64_t szn, int64_t szo,  // logits strides
                          int64_t syh, int64_t syn,               // labels strides
                          int64_t H, int64_t N, int64_t O, bool mean) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= H * N) return;  // whole warps exit together: the shuffles below stay full-warp
  const int64_t h = row / N, n = row % N;
  const scalar_t* z = logits + h * szh + n * szn;
  const int64_t y = labels[h * syh + n * syn];
  const bool ok = y >= 0 && y < O;
  const acc_t w = ok ? (mean ? acc_t(1) / static_cast<acc_t>(N) : acc_t(1)) : acc_t(NAN);
  scalar_t* d = dlogits + row * O;

  acc_t m = -INFINITY;
  acc_t cache[VPT > 0 ? VPT : 1];
  if constexpr (VPT > 0) {
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int64_t c = lane + static_cast<int64_t>(i) * 32;
      cache[i] = c < O ? static_cast<acc_t>(z[c * szo]) : acc_t(-INFINITY);
      m = fmax(m, cache[i]);
    }
  } else {
    for (int64_t c = lane; c < O; c += 32) m = fmax(m, static_cast<acc_t>(z[c * szo]));
  }
  m = warp_max(m);
  acc_t s = 0;
  if constexpr (VPT > 0) {
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      cache[i] = exp_(cache[i] - m);  // exp(-inf) = 0 on padding lanes
      s += cache[i];
    }
  } else {
    for (int64_t c = lane; c < O; c += 32) s += exp_(static_cast<acc_t>(z[c * szo]) - m);
  }
  s = warp_sum(s);
  const acc_t lse = m + log_(s);
  if (lane == 0) {
    const acc_t zy = ok ? static_cast<acc_t>(z[y * szo]) : acc_t(0);
    row_loss[row] = w * (lse - zy);
  }
  const acc_t inv_s = acc_t(1) / s;
  if constexpr (VPT > 0) {
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int64_t c = lane + static_cast<int64_t>(i) * 32;
      if (c < O) d[c] = static_cast<scalar_t>(w * (cache[i] * inv_s - (c == y ? acc_t(1) : acc_t(0))));
    }
  } else {
    for (int64_t c = lane; c < O; c += 32) {
      const acc_t p = exp_(static_cast<acc_t>(z[c * szo]) - lse);
      d[c] = static_cast<scalar_t>(w * (p - (c == y ? acc_t(1) : acc_t(0))));
    }
  }
}

template <typename F>
void with_vpt(int64_t O, F&& f) {
  if (O <= 32) f(std::integral_constant<int, 1>{});
  else if (O <= 128) f(std::integral_constant<int, 4>{});
  else if (O <= 512) f(std::integral_constant<int, 16>{});
  else f(std::integral_constant<int, 0>{});
}

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& features, const at::Tensor& weight, const at::Tensor& bias,
                                       const at::Tensor& labels, bool mean) {
  CHECK_CUDA(weight);
  CHECK_FLOATING(weight);
  CHECK_DIM(weight, 3);
  CHECK_CUDA(features);
  CHECK_SAME_DEVICE(features, weight);
  CHECK_DTYPE(features, weight.scalar_type());
  CHECK_CUDA(bias);
  CHECK_SAME_DEVICE(bias, weight);
  CHECK_DTYPE(bias, weight.scalar_type());
  CHECK_CUDA(labels);
  CHECK_SAME_DEVICE(labels, weight);
  CHECK_DTYPE(labels, at::kLong);
  const int64_t H = weight.size(0), O = weight.size(1), I = weight.size(2);
  TORCH_CHECK(O >= 1, "weight must have at least one class, got shape ", weight.sizes());
  TORCH_CHECK((features.dim() == 3 && features.size(0) == H && features.size(2) == I) ||
                  (features.dim() == 2 && features.size(1) == I),
              "features must have shape [H, N, I] or [N, I] with H = ", H, ", I = ", I, ", got ", features.sizes());
  const int64_t N = features.size(-2);
  TORCH_CHECK(bias.dim() == 2 && bias.size(0) == H && bias.size(1) == O, "bias must have shape [H, O] = [", H, ", ",
              O, "], got ", bias.sizes());
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == H && labels.size(1) == N, "labels must have shape [H, N] = [",
              H, ", ", N, "], got ", labels.sizes());

  const c10::cuda::CUDAGuard guard(weight.device());
  at::Tensor row_loss = at::empty({H, N}, weight.options().dtype(acc_dtype(weight.scalar_type())));
  at::Tensor dlogits = at::empty({H, N, O}, weight.options());
  if (H == 0 || N == 0) return {row_loss, dlogits};

  // [H, N, O] logits (a strided view for shared features: one [N, H*O] GEMM, bias as C).
  at::Tensor logits;
  if (features.dim() == 2) {
    logits = at::addmm(bias.reshape({H * O}), features, weight.reshape({H * O, I}).t());
    logits = logits.view({N, H, O}).permute({1, 0, 2});
  } else {
    logits = at::baddbmm(bias.unsqueeze(1), features, weight.transpose(1, 2));
  }

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = (H * N + kWarpsPerBlock - 1) / kWarpsPerBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "multitask_heads_ce_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_vpt(O, [&](auto vpt) {
      constexpr int VPT = decltype(vpt)::value;
      ce_kernel<scalar_t, acc_t, VPT><<<static_cast<unsigned>(blocks), 32 * kWarpsPerBlock, 0, stream>>>(
          logits.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(), row_loss.data_ptr<acc_t>(),
          dlogits.data_ptr<scalar_t>(), logits.stride(0), logits.stride(1), logits.stride(2), labels.stride(0),
          labels.stride(1), H, N, O, mean);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {row_loss, dlogits};
}

}  // namespace multitask_heads
}  // namespace metafast

TORCH_LIBRARY_FRAGMENT(metafast, m) {
  // (row_loss [H, N] = w * loss in float32 (float64 for float64), dlogits [H, N, O] = w * (softmax - onehot))
  // of the heads' logits features @ weight^T + bias; w = 1/N when `mean`, else 1. features: [H, N, I] or
  // shared [N, I]. Labels outside [0, O) give NaN rows.
  m.def(
      "multitask_heads_ce_fwd_cuda(Tensor features, Tensor weight, Tensor bias, Tensor labels, bool mean) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(metafast, CUDA, m) {
  m.impl("multitask_heads_ce_fwd_cuda", &metafast::multitask_heads::fwd);
}
