// Helpers shared by the row-wise softmax kernels (kd_loss, task_cross_entropy, multitask_heads): an
// online (running max, running sum of exp) softmax state, its reductions over a group of TPR threads
// that owns one row, and launch/dtype plumbing common to those kernels.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <type_traits>

namespace metafast {
namespace softmax {

// Compile-time int for the (TPR, VPT) dispatch lambdas.
template <int V>
using Int = std::integral_constant<int, V>;

// Threads per block for TPR threads per row: one row per block when TPR > 32, else 256 threads.
constexpr int block_threads(int tpr) { return tpr > 32 ? tpr : 256; }

// Finite stand-in for -inf as a running max's start: exp(m_old - m_new) never sees
// (-inf) - (-inf) = NaN when a row begins with -inf logits (masked classes).
template <typename acc_t>
__device__ __forceinline__ acc_t neg_big() {
  return acc_t(-3.0e38);
}

// exp/log overloaded on the accumulation type, so templated kernels call the float math functions for
// float and the double ones for double.
__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log_(float x) { return logf(x); }
__device__ __forceinline__ double log_(double x) { return log(x); }

// Running softmax state: max m and z = sum exp(x - m). Add one value (one exp).
template <typename acc_t>
__device__ __forceinline__ void push(acc_t& m, acc_t& z, acc_t x) {
  if (x > m) {
    z = z * exp_(m - x) + acc_t(1);
    m = x;
  } else {
    z += exp_(x - m);
  }
}

// Merge two running states; symmetric, so every lane of a butterfly ends with the same bits.
template <typename acc_t>
__device__ __forceinline__ void merge(acc_t& m, acc_t& z, acc_t m2, acc_t z2) {
  const acc_t mn = m > m2 ? m : m2;
  z = z * exp_(m - mn) + z2 * exp_(m2 - mn);
  m = mn;
}

// Sum over the TPR threads of a row group, returned to all of them. Every thread of the block must
// call it (TPR > 32 synchronises the block; smem holds 64 values and may be reused right away).
template <int TPR, typename T>
__device__ __forceinline__ T group_sum(T v, T* smem) {
  constexpr int W = TPR < 32 ? TPR : 32;
#pragma unroll
  for (int o = W / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if constexpr (TPR > 32) {
    __syncthreads();  // a previous reduction may still be reading smem
    if ((threadIdx.x & 31) == 0) smem[threadIdx.x >> 5] = v;
    __syncthreads();
    v = smem[0];
#pragma unroll
    for (int i = 1; i < TPR / 32; ++i) v += smem[i];
  }
  return v;
}

// Merged (max, sum of exp) over the row group; same calling rules as group_sum.
template <int TPR, typename T>
__device__ __forceinline__ void group_max_sum(T& m, T& z, T* smem) {
  constexpr int W = TPR < 32 ? TPR : 32;
#pragma unroll
  for (int o = W / 2; o > 0; o >>= 1) {
    const T m2 = __shfl_xor_sync(0xffffffffu, m, o);
    const T z2 = __shfl_xor_sync(0xffffffffu, z, o);
    merge(m, z, m2, z2);
  }
  if constexpr (TPR > 32) {
    __syncthreads();
    if ((threadIdx.x & 31) == 0) {
      smem[threadIdx.x >> 5] = m;
      smem[32 + (threadIdx.x >> 5)] = z;
    }
    __syncthreads();
    m = smem[0];
    z = smem[32];
#pragma unroll
    for (int i = 1; i < TPR / 32; ++i) merge(m, z, smem[i], smem[32 + i]);
  }
}

// dtype of the per-row float outputs (losses, lse, row weights): float64 for float64 logits, else
// float32 (half/bfloat16 accumulate in float).
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace softmax
}  // namespace metafast
