// Device helpers shared by the inner_update kernels: packed (16-byte) loads, block reductions, the
// clip coefficient, launch sizing.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

namespace metafast {
namespace inner_update {

constexpr int kThreads = 256;  // threads per block for every kernel here
constexpr int kMaxGridY = 65535;

// How the learning rate is given (uniform over a launch, so branching on it costs nothing).
enum LrMode : int {
  kLrValue = 0,      // a host scalar passed by value
  kLrScalarPtr = 1,  // a 0-d device tensor
  kLrPerElem = 2,    // one value per element (Meta-SGD)
};

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;  // float for half/bfloat16/float, double for double

// Elements per 16-byte access.
template <typename scalar_t>
constexpr int pack_size() {
  return 16 / static_cast<int>(sizeof(scalar_t));
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& x) {
  *reinterpret_cast<Pack<T, N>*>(p) = x;
}

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of `v` over the block, returned to every thread. `smem` holds 33 values. Every thread of the
// block must call it (it synchronises); consecutive calls may reuse the same `smem`.
template <typename T>
__device__ T block_sum(T v, T* smem) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // the previous call may still be reading smem
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int nwarps = (blockDim.x + 31) >> 5;
    v = lane < nwarps ? smem[lane] : T(0);
    v = warp_sum(v);
    if (lane == 0) smem[32] = v;
  }
  __syncthreads();
  return smem[32];
}

// torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + 1e-6), applied when coef <= 1.
template <typename acc_t>
__device__ __forceinline__ acc_t clip_coef(acc_t norm, acc_t max_norm) {
  return max_norm / (norm + acc_t(1e-6));
}

// Enough blocks to fill the GPU about `waves` times over (the kernels stride over the rest).
inline int64_t target_blocks(int waves = 8) {
  static std::atomic<int> sm_count[64];  // per device; 0 = not queried yet
  const int dev = c10::cuda::current_device();
  int sms = dev < 64 ? sm_count[dev].load(std::memory_order_relaxed) : 0;
  if (sms == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    if (dev < 64) sm_count[dev].store(sms, std::memory_order_relaxed);
  }
  return static_cast<int64_t>(sms) * waves;
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace inner_update
}  // namespace metafast
