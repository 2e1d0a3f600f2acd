// The batched inner-loop update for T tasks over P parameters, and its backward.
//
//   fast[t, p] = theta[p or t, p] - lr[p or scalar] * scale[t] * grad[t, p]
//   scale[t]   = min(1, c[t]),  c[t] = max_norm / (n[t] + 1e-6),  n[t] = ||grad[t, :]||_2
//                (scale = 1 without clipping; torch.nn.utils.clip_grad_norm_ applied per task row)
//
// Forward: [clip] per-task partial sums of grad^2 -> update (each block finishes its task's sum).
// Backward, for the gradient g_out of sum(g_out * fast):
//   d_grad[t, p] = -scale[t] * lr[p] * g_out[t, p] + kk[t] * grad[t, p]
//   kk[t]        = s[t] * max_norm / ((n[t] + 1e-6)^2 n[t])  when c[t] <= 1 and n[t] > 0, else 0
//   s[t]         = sum_p g_out[t, p] * lr[p] * grad[t, p]    (dscale/dgrad = -max_norm/(n+eps)^2 * grad/n)
//   d_theta[p]   = sum_t g_out[t, p]                         (theta broadcast over tasks)
//   d_lr[p]      = -sum_t scale[t] * g_out[t, p] * grad[t, p] (summed over p as well for a scalar lr)
// [clip] partial sums of grad^2 and of g_out*lr*grad -> per-task scale/kk -> one pass over p that
// loops over tasks, so the sums over t stay in registers.
//
// Accumulation is float32 for float16/bfloat16/float32 and float64 for float64; indices are int64.
// Only the headers used (not ATen/ATen.h): keeps the compile short, as CI builds on every run.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "checks.h"
#include "inner_update.h"
#include "inner_update_common.cuh"

namespace metafast {
namespace inner_update {
namespace {

// Per-task partial sums over slices of the row, one slice per block along x (nparts = gridDim.x):
//   sumsq[t, b] = sum_{p in slice b} grad[t, p]^2
//   dot[t, b]   = sum_{p in slice b} grad_out[t, p] * lr[p] * grad[t, p]
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads) row_partials_kernel(
    const scalar_t* __restrict__ grad,        // [T, P]
    const scalar_t* __restrict__ grad_out,    // [T, P], or null: no dot
    const scalar_t* __restrict__ lr,          // [P] or [] (lr_mode), or null
    acc_type<scalar_t>* __restrict__ sumsq,   // [T, nparts] out
    acc_type<scalar_t>* __restrict__ dot,     // [T, nparts] out, null iff grad_out is null
    int64_t T, int64_t P,                     // sizes
    int lr_mode, acc_type<scalar_t> lr_value  // LrMode; the lr when kLrValue
) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t smem[33];
  const int64_t nparts = gridDim.x;
  const int64_t step = nparts * blockDim.x * VEC;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  const acc_t lr_s = lr_mode == kLrScalarPtr ? static_cast<acc_t>(*lr) : lr_value;
  for (int64_t t = blockIdx.y; t < T; t += gridDim.y) {
    const scalar_t* g_row = grad + t * P;
    acc_t ss = 0, dd = 0;
    for (int64_t i = first; i < P; i += step) {
      const auto g = load_pack<VEC>(g_row + i);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const acc_t x = static_cast<acc_t>(g.v[k]);
        ss += x * x;
      }
      if (grad_out != nullptr) {
        const auto go = load_pack<VEC>(grad_out + t * P + i);
        if (lr_mode == kLrPerElem) {
          const auto l = load_pack<VEC>(lr + i);
#pragma unroll
          for (int k = 0; k < VEC; ++k)
            dd += static_cast<acc_t>(go.v[k]) * static_cast<acc_t>(l.v[k]) * static_cast<acc_t>(g.v[k]);
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) dd += static_cast<acc_t>(go.v[k]) * static_cast<acc_t>(g.v[k]);
        }
      }
    }
    ss = block_sum(ss, smem);
    if (dot != nullptr) dd = block_sum(dd, smem);  // uniform over the block
    if (threadIdx.x == 0) {
      sumsq[t * nparts + blockIdx.x] = ss;
      if (dot != nullptr) dot[t * nparts + blockIdx.x] = lr_mode == kLrPerElem ? dd : lr_s * dd;
    }
  }
}

// fast[t, p] = theta[t * theta_row_stride + p] - lr[p] * scale[t] * grad[t, p]; scale[t] comes from the
// task's nparts partial sums of grad^2 (every block of the task reduces them: nparts is small).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads) inner_update_fwd_kernel(
    const scalar_t* __restrict__ theta,             // [P] or [T, P]
    const scalar_t* __restrict__ grad,              // [T, P]
    const scalar_t* __restrict__ lr,                // [P] or [] (lr_mode), or null
    const acc_type<scalar_t>* __restrict__ sumsq,   // [T, nparts] partial sums of grad^2, null: no clip
    scalar_t* __restrict__ out,                     // [T, P]
    int64_t theta_row_stride,                       // 0 when theta is broadcast over tasks, else P
    int64_t T, int64_t P, int64_t nparts,           // sizes
    int lr_mode, acc_type<scalar_t> lr_value,       // LrMode; the lr when kLrValue
    acc_type<scalar_t> max_norm                     // clip threshold (used when sumsq is given)
) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t smem[33];
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x * VEC;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  const acc_t lr_s = lr_mode == kLrScalarPtr ? static_cast<acc_t>(*lr) : lr_value;
  for (int64_t t = blockIdx.y; t < T; t += gridDim.y) {
    acc_t scale = 1;
    if (sumsq != nullptr) {
      acc_t ss = 0;
      for (int64_t j = threadIdx.x; j < nparts; j += blockDim.x) ss += sumsq[t * nparts + j];
      ss = block_sum(ss, smem);
      const acc_t c = clip_coef(static_cast<acc_t>(sqrt(ss)), max_norm);
      scale = c < acc_t(1) ? c : acc_t(1);
    }
    const scalar_t* th_row = theta + t * theta_row_stride;
    const scalar_t* g_row = grad + t * P;
    scalar_t* o_row = out + t * P;
    for (int64_t i = first; i < P; i += step) {
      const auto th = load_pack<VEC>(th_row + i);
      const auto g = load_pack<VEC>(g_row + i);
      Pack<scalar_t, VEC> o;
      if (lr_mode == kLrPerElem) {
        const auto l = load_pack<VEC>(lr + i);
#pragma unroll
        for (int k = 0; k < VEC; ++k)
          o.v[k] = static_cast<scalar_t>(static_cast<acc_t>(th.v[k]) -
                                         static_cast<acc_t>(l.v[k]) * (scale * static_cast<acc_t>(g.v[k])));
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k)
          o.v[k] = static_cast<scalar_t>(static_cast<acc_t>(th.v[k]) - lr_s * (scale * static_cast<acc_t>(g.v[k])));
      }
      store_pack<VEC>(o_row + i, o);
    }
  }
}

// Per-task clip coefficients of the backward from the partial sums (see the file comment).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) clip_coeffs_kernel(
    const acc_t* __restrict__ sumsq,  // [T, nparts] partial sums of grad^2
    const acc_t* __restrict__ dot,    // [T, nparts] partial sums of grad_out * lr * grad
    acc_t* __restrict__ scale,        // [T] out
    acc_t* __restrict__ kk,           // [T] out
    int64_t T, int64_t nparts,        // sizes
    acc_t max_norm) {
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < T;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t ss = 0, s = 0;
    for (int64_t j = 0; j < nparts; ++j) {
      ss += sumsq[t * nparts + j];
      s += dot[t * nparts + j];
    }
    const acc_t n = sqrt(ss);
    const acc_t c = clip_coef(n, max_norm);
    // clamp(c, max=1) passes the gradient at c == 1, like the reference's autograd.
    const bool clipped = c <= acc_t(1);
    const acc_t ne = n + acc_t(1e-6);
    scale[t] = clipped ? c : acc_t(1);
    kk[t] = (clipped && n > acc_t(0)) ? s * max_norm / (ne * ne * n) : acc_t(0);
  }
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads) inner_update_bwd_kernel(
    const scalar_t* __restrict__ grad_out,          // [T, P]
    const scalar_t* __restrict__ grad,              // [T, P] (read when d_lr or kk is given)
    const scalar_t* __restrict__ lr,                // [P] or [] (lr_mode), or null
    const acc_type<scalar_t>* __restrict__ scale,   // [T], or null: 1
    const acc_type<scalar_t>* __restrict__ kk,      // [T], or null: 0
    scalar_t* __restrict__ d_grad,                  // [T, P] out, or null
    scalar_t* __restrict__ d_theta,                 // [P] out, or null
    acc_type<scalar_t>* __restrict__ d_lr,          // [P] out (column sums), or null
    int64_t T, int64_t P,                           // sizes
    int lr_mode, acc_type<scalar_t> lr_value        // LrMode; the lr when kLrValue
) {
  using acc_t = acc_type<scalar_t>;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x * VEC;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  const acc_t lr_s = lr_mode == kLrScalarPtr ? static_cast<acc_t>(*lr) : lr_value;
  const bool read_grad = d_lr != nullptr || (kk != nullptr && d_grad != nullptr);
  for (int64_t i = first; i < P; i += step) {
    acc_t l[VEC];
    if (lr_mode == kLrPerElem) {
      const auto lp = load_pack<VEC>(lr + i);
#pragma unroll
      for (int k = 0; k < VEC; ++k) l[k] = static_cast<acc_t>(lp.v[k]);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) l[k] = lr_s;
    }
    acc_t sum_go[VEC], sum_lr[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) sum_go[k] = sum_lr[k] = acc_t(0);
    for (int64_t t = 0; t < T; ++t) {
      const acc_t s = scale != nullptr ? scale[t] : acc_t(1);
      const acc_t q = kk != nullptr ? kk[t] : acc_t(0);
      const auto go = load_pack<VEC>(grad_out + t * P + i);
      Pack<scalar_t, VEC> g;
      if (read_grad) g = load_pack<VEC>(grad + t * P + i);
      if (d_grad != nullptr) {
        Pack<scalar_t, VEC> dg;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          acc_t v = -s * l[k] * static_cast<acc_t>(go.v[k]);
          if (kk != nullptr) v += q * static_cast<acc_t>(g.v[k]);
          dg.v[k] = static_cast<scalar_t>(v);
        }
        store_pack<VEC>(d_grad + t * P + i, dg);
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        sum_go[k] += static_cast<acc_t>(go.v[k]);
        if (d_lr != nullptr) sum_lr[k] -= s * static_cast<acc_t>(go.v[k]) * static_cast<acc_t>(g.v[k]);
      }
    }
    if (d_theta != nullptr) {
      Pack<scalar_t, VEC> dt;
#pragma unroll
      for (int k = 0; k < VEC; ++k) dt.v[k] = static_cast<scalar_t>(sum_go[k]);
      store_pack<VEC>(d_theta + i, dt);
    }
    if (d_lr != nullptr) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) d_lr[i + k] = sum_lr[k];
    }
  }
}

// ------------------------------------------------------------------------------------- launchers

struct LrArg {
  const void* ptr;  // device pointer of the lr tensor, or null
  int mode;         // LrMode
  double value;     // used when mode == kLrValue
};

// Validates the optional lr tensor against grad [T, P].
LrArg check_lr(const std::optional<at::Tensor>& lr_opt, double lr_scalar, const at::Tensor& grad) {
  if (!lr_opt.has_value()) return {nullptr, kLrValue, lr_scalar};
  const at::Tensor& lr = *lr_opt;
  CHECK_INPUT(lr);
  CHECK_SAME_DEVICE(lr, grad);
  CHECK_DTYPE(lr, grad.scalar_type());
  TORCH_CHECK(lr.dim() == 0 || (lr.dim() == 1 && lr.size(0) == grad.size(1)),
              "lr must be 0-d or of shape [P] = [", grad.size(1), "], got shape ", lr.sizes());
  return {lr.data_ptr(), lr.dim() == 0 ? kLrScalarPtr : kLrPerElem, 0.0};
}

void check_grad(const at::Tensor& grad) {
  CHECK_INPUT(grad);
  CHECK_FLOATING(grad);
  CHECK_DIM(grad, 2);
}

void check_max_norm(const std::optional<double>& max_norm) {
  TORCH_CHECK(!max_norm.has_value() || *max_norm > 0, "max_norm must be None or > 0, got ", max_norm.value_or(0));
}

// Slices per task for the partial sums: enough blocks to fill the GPU, few enough (<= 1024) that
// reducing them is cheap for the kernel that consumes them.
int64_t choose_nparts(int64_t T, int64_t P, int vec) {
  const int64_t rows = std::min<int64_t>(T, kMaxGridY);
  return std::max<int64_t>(1, std::min<int64_t>({ceil_div(P, int64_t(kThreads) * vec),
                                                  ceil_div(target_blocks(), rows), 1024}));
}

}  // namespace

at::Tensor inner_update_cuda(const at::Tensor& theta, const at::Tensor& grad, const std::optional<at::Tensor>& lr,
                             double lr_scalar, std::optional<double> max_norm) {
  check_grad(grad);
  CHECK_INPUT(theta);
  CHECK_SAME_DEVICE(theta, grad);
  CHECK_DTYPE(theta, grad.scalar_type());
  const int64_t T = grad.size(0), P = grad.size(1);
  TORCH_CHECK((theta.dim() == 1 && theta.size(0) == P) || (theta.dim() == 2 && theta.sizes() == grad.sizes()),
              "theta must have shape [P] = [", P, "] or [T, P] = ", grad.sizes(), ", got ", theta.sizes());
  const LrArg lra = check_lr(lr, lr_scalar, grad);
  check_max_norm(max_norm);

  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor out = at::empty({T, P}, grad.options());
  if (out.numel() == 0) return out;
  const auto stream = current_stream();
  const int64_t theta_row_stride = theta.dim() == 1 ? 0 : P;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "inner_update_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    constexpr int V = pack_size<scalar_t>();
    const bool vec = P % V == 0 && aligned16(theta.data_ptr()) && aligned16(grad.data_ptr()) &&
                     aligned16(out.data_ptr()) && (lra.mode != kLrPerElem || aligned16(lra.ptr));
    const int v = vec ? V : 1;
    const int64_t gy = std::min<int64_t>(T, kMaxGridY);
    const auto* lr_ptr = static_cast<const scalar_t*>(lra.ptr);

    at::Tensor sumsq;
    int64_t nparts = 0;
    if (max_norm.has_value()) {
      nparts = choose_nparts(T, P, v);
      sumsq = at::empty({T, nparts}, grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      const dim3 grid(static_cast<unsigned>(nparts), static_cast<unsigned>(gy));
      auto kernel = vec ? row_partials_kernel<scalar_t, V> : row_partials_kernel<scalar_t, 1>;
      kernel<<<grid, kThreads, 0, stream>>>(grad.const_data_ptr<scalar_t>(), nullptr, lr_ptr,
                                            sumsq.mutable_data_ptr<acc_t>(), nullptr, T, P, lra.mode,
                                            static_cast<acc_t>(lra.value));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int64_t gx = std::max<int64_t>(
        1, std::min<int64_t>(ceil_div(P, int64_t(kThreads) * v), ceil_div(target_blocks(), gy)));
    const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
    auto kernel = vec ? inner_update_fwd_kernel<scalar_t, V> : inner_update_fwd_kernel<scalar_t, 1>;
    kernel<<<grid, kThreads, 0, stream>>>(
        theta.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(), lr_ptr,
        max_norm.has_value() ? sumsq.const_data_ptr<acc_t>() : nullptr, out.mutable_data_ptr<scalar_t>(),
        theta_row_stride, T, P, nparts, lra.mode, static_cast<acc_t>(lra.value),
        static_cast<acc_t>(max_norm.value_or(1.0)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> inner_update_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& grad, const std::optional<at::Tensor>& lr, double lr_scalar,
    std::optional<double> max_norm, bool need_grad, bool need_theta, bool need_lr) {
  check_grad(grad);
  CHECK_INPUT(grad_out);
  CHECK_SAME_DEVICE(grad_out, grad);
  CHECK_DTYPE(grad_out, grad.scalar_type());
  TORCH_CHECK(grad_out.sizes() == grad.sizes(), "grad_out must have the shape of grad ", grad.sizes(), ", got ",
              grad_out.sizes());
  const LrArg lra = check_lr(lr, lr_scalar, grad);
  check_max_norm(max_norm);
  TORCH_CHECK(!need_lr || lr.has_value(), "need_lr is set but lr is not a tensor");

  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t T = grad.size(0), P = grad.size(1);
  const auto empty = [&] { return at::empty({0}, grad.options()); };
  at::Tensor d_grad = need_grad ? at::empty({T, P}, grad.options()) : empty();
  at::Tensor d_theta = need_theta ? at::empty({P}, grad.options()) : empty();
  at::Tensor d_lr = empty();
  if (!(need_grad || need_theta || need_lr)) return {d_grad, d_theta, d_lr};
  if (T == 0 || P == 0) {
    if (need_theta) d_theta.zero_();
    if (need_lr) d_lr = at::zeros_like(*lr);
    return {d_grad, d_theta, d_lr};
  }
  const auto stream = current_stream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "inner_update_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto acc_opts = grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    constexpr int V = pack_size<scalar_t>();
    const bool vec = P % V == 0 && aligned16(grad_out.data_ptr()) && aligned16(grad.data_ptr()) &&
                     (!need_grad || aligned16(d_grad.data_ptr())) &&
                     (!need_theta || aligned16(d_theta.data_ptr())) &&
                     (lra.mode != kLrPerElem || aligned16(lra.ptr));
    const int v = vec ? V : 1;
    const auto* lr_ptr = static_cast<const scalar_t*>(lra.ptr);

    // The clip terms matter only for d_grad (scale and kk) and d_lr (scale).
    at::Tensor scale, kk;
    const bool clip = max_norm.has_value() && (need_grad || need_lr);
    if (clip) {
      const int64_t nparts = choose_nparts(T, P, v);
      at::Tensor sumsq = at::empty({T, nparts}, acc_opts);
      at::Tensor dot = at::empty({T, nparts}, acc_opts);
      const dim3 grid(static_cast<unsigned>(nparts), static_cast<unsigned>(std::min<int64_t>(T, kMaxGridY)));
      auto partials = vec ? row_partials_kernel<scalar_t, V> : row_partials_kernel<scalar_t, 1>;
      partials<<<grid, kThreads, 0, stream>>>(grad.const_data_ptr<scalar_t>(), grad_out.const_data_ptr<scalar_t>(),
                                              lr_ptr, sumsq.mutable_data_ptr<acc_t>(), dot.mutable_data_ptr<acc_t>(),
                                              T, P, lra.mode, static_cast<acc_t>(lra.value));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      scale = at::empty({T}, acc_opts);
      kk = at::empty({T}, acc_opts);
      const int64_t blocks = std::min<int64_t>(ceil_div(T, kThreads), 65535);
      clip_coeffs_kernel<acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          sumsq.const_data_ptr<acc_t>(), dot.const_data_ptr<acc_t>(), scale.mutable_data_ptr<acc_t>(),
          kk.mutable_data_ptr<acc_t>(), T, nparts, static_cast<acc_t>(*max_norm));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    at::Tensor d_lr_cols = need_lr ? at::empty({P}, acc_opts) : at::Tensor();
    const int64_t gx = std::max<int64_t>(
        1, std::min<int64_t>(ceil_div(P, int64_t(kThreads) * v), target_blocks()));
    auto kernel = vec ? inner_update_bwd_kernel<scalar_t, V> : inner_update_bwd_kernel<scalar_t, 1>;
    kernel<<<static_cast<unsigned>(gx), kThreads, 0, stream>>>(
        grad_out.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(), lr_ptr,
        clip ? scale.const_data_ptr<acc_t>() : nullptr, clip && need_grad ? kk.const_data_ptr<acc_t>() : nullptr,
        need_grad ? d_grad.mutable_data_ptr<scalar_t>() : nullptr,
        need_theta ? d_theta.mutable_data_ptr<scalar_t>() : nullptr,
        need_lr ? d_lr_cols.mutable_data_ptr<acc_t>() : nullptr, T, P, lra.mode, static_cast<acc_t>(lra.value));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (need_lr) {
      d_lr = (lr->dim() == 0 ? d_lr_cols.sum() : d_lr_cols).to(grad.scalar_type());
    }
  });
  return {d_grad, d_theta, d_lr};
}

}  // namespace inner_update
}  // namespace metafast
