// CUDA launchers of the fused MLP inner loop (the per-task code is in fused_inner_loop.h): one block
// of kThreads threads per task. The task's workspace (fast weights, activations, their R-versions)
// lives in dynamic shared memory when it fits the device's opt-in limit, else in a global scratch
// [T, size] (large widths / many rows), with the same code either way.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "fused_inner_loop.h"

namespace metafast {
namespace fused_inner_loop {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

struct CudaExec {
  int tid;
  static constexpr int nthreads = kThreads;
  static constexpr int kLanes = 2;
  template <typename T>
  static constexpr int vec() { return 1; }  // one output per thread, in a register
  template <typename T>
  static constexpr int rows() { return 1; }
  double* red;                              // kWarps slots of shared memory for sum()
  __device__ void sync() const { __syncthreads(); }
  // Block-wide sum; every thread gets the total.
  template <typename T>
  __device__ T sum(T v) const {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    T* r = reinterpret_cast<T*>(red);
    if ((tid & 31) == 0) r[tid >> 5] = v;
    __syncthreads();
    T total = T(0);
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += r[w];
    __syncthreads();  // the slots may be reused by the next sum()
    return total;
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads) forward_kernel(Plan p, const T* __restrict__ theta, const T* lr,
                                                           const T* sx, const char* sy, const T* qx, const char* qy,
                                                           T* ql, T* sl, T* fast, T* qout, T* saved, T* gscratch,
                                                           int64_t ysz) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ double red[kWarps];
  const int64_t t = blockIdx.x;
  T* ws = gscratch != nullptr ? gscratch + t * p.size : reinterpret_cast<T*>(smem_raw);
  const CudaExec ex{static_cast<int>(threadIdx.x), red};
  FwdTask<T> a;
  a.theta = theta;
  a.lr = lr;
  a.sx = sx + t * p.Ns * p.d[0];
  a.sy = sy + t * p.Ns * ysz;
  a.qx = qx + t * p.Nq * p.d[0];
  a.qy = qy + t * p.Nq * ysz;
  a.query_loss = ql + t;
  a.support_loss = sl + t;
  a.fast = fast == nullptr ? nullptr : fast + t * p.P;
  a.query_out = qout + t * p.Nq * p.d[p.L];
  a.saved = saved == nullptr ? nullptr : saved + t * p.saved_size;
  forward_task(ex, p, a, ws);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) backward_kernel(Plan p, const T* gq, int64_t gq_stride, const T* theta,
                                                            const T* lr, const T* sx, const char* sy, const T* saved,
                                                            T* gt, T* glr, T* gscratch, int64_t ysz,
                                                            bool first_order) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ double red[kWarps];
  const int64_t t = blockIdx.x;
  T* ws = gscratch != nullptr ? gscratch + t * p.size : reinterpret_cast<T*>(smem_raw);
  const CudaExec ex{static_cast<int>(threadIdx.x), red};
  BwdTask<T> a;
  a.gq = gq[t * gq_stride];
  a.theta = theta;
  a.lr = lr;
  a.sx = sx + t * p.Ns * p.d[0];
  a.sy = sy + t * p.Ns * ysz;
  a.saved = saved + t * p.saved_size;
  a.grad_theta = gt + t * p.P;
  a.grad_lr = glr == nullptr ? nullptr : glr + t * p.P;
  backward_task(ex, p, a, first_order, ws);
}

// Dynamic shared memory for one task's workspace, or 0 (global scratch) when it does not fit.
template <typename K>
size_t smem_bytes_for(K kernel, int64_t bytes) {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  const int64_t avail = static_cast<int64_t>(optin) - static_cast<int64_t>(attr.sharedSizeBytes);
  if (bytes > avail) return 0;
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  return static_cast<size_t>(bytes);
}

int64_t label_stride(const Plan& p, int64_t elem) {
  return (p.loss_kind == kMSE ? static_cast<int64_t>(p.d[p.L]) : 1) * elem;
}

}  // namespace

void forward_cuda(const Plan& p, const at::Tensor& theta, const at::Tensor& lr, const at::Tensor& sx,
                  const at::Tensor& sy, const at::Tensor& qx, const at::Tensor& qy, const at::Tensor& query_loss,
                  const at::Tensor& support_loss, const at::Tensor& fast, const at::Tensor& query_out,
                  const at::Tensor& saved) {
  const c10::cuda::CUDAGuard guard(theta.device());
  const int64_t T = sx.size(0);
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "fused_inner_loop_cxx", [&] {
    auto kernel = forward_kernel<scalar_t>;
    const int64_t bytes = p.size * static_cast<int64_t>(sizeof(scalar_t));
    const size_t smem = smem_bytes_for(kernel, bytes);
    at::Tensor scratch;
    if (smem == 0) scratch = at::empty({T, p.size}, theta.options());
    const int64_t ysz = label_stride(p, p.loss_kind == kMSE ? sizeof(scalar_t) : sizeof(int64_t));
    kernel<<<static_cast<unsigned>(T), kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
        p, theta.data_ptr<scalar_t>(), lr.data_ptr<scalar_t>(), sx.data_ptr<scalar_t>(),
        static_cast<const char*>(sy.data_ptr()), qx.data_ptr<scalar_t>(), static_cast<const char*>(qy.data_ptr()),
        query_loss.data_ptr<scalar_t>(), support_loss.data_ptr<scalar_t>(),
        fast.numel() > 0 ? fast.data_ptr<scalar_t>() : nullptr,
        query_out.data_ptr<scalar_t>(), saved.numel() > 0 ? saved.data_ptr<scalar_t>() : nullptr,
        smem == 0 ? scratch.data_ptr<scalar_t>() : nullptr, ysz);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void backward_cuda(const Plan& p, const at::Tensor& grad_query_loss, const at::Tensor& theta, const at::Tensor& lr,
                   const at::Tensor& sx, const at::Tensor& sy, const at::Tensor& saved,
                   const at::Tensor& grad_theta_t, const at::Tensor& grad_lr_t, bool first_order) {
  const c10::cuda::CUDAGuard guard(sx.device());
  const int64_t T = sx.size(0);
  AT_DISPATCH_FLOATING_TYPES(sx.scalar_type(), "fused_inner_loop_backward_cxx", [&] {
    auto kernel = backward_kernel<scalar_t>;
    const int64_t bytes = p.size * static_cast<int64_t>(sizeof(scalar_t));
    const size_t smem = smem_bytes_for(kernel, bytes);
    at::Tensor scratch;
    if (smem == 0) scratch = at::empty({T, p.size}, sx.options());
    const int64_t ysz = label_stride(p, p.loss_kind == kMSE ? sizeof(scalar_t) : sizeof(int64_t));
    kernel<<<static_cast<unsigned>(T), kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
        p, grad_query_loss.data_ptr<scalar_t>(), grad_query_loss.numel() == 1 ? 0 : 1, theta.data_ptr<scalar_t>(),
        lr.data_ptr<scalar_t>(), sx.data_ptr<scalar_t>(),
        static_cast<const char*>(sy.data_ptr()), saved.data_ptr<scalar_t>(), grad_theta_t.data_ptr<scalar_t>(),
        grad_lr_t.defined() ? grad_lr_t.data_ptr<scalar_t>() : nullptr, smem == 0 ? scratch.data_ptr<scalar_t>() : nullptr,
        ysz, first_order);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fused_inner_loop
}  // namespace metafast
