// metafast::fused_inner_loop_cxx / fused_inner_loop_backward_cxx: the whole MAML inner loop of an MLP
// and its exact reverse (see fused_inner_loop.h), as raw ops (no autograd) for the CPU and CUDA
// dispatch keys. This file holds the schemas, the argument checks shared by both devices, and the
// CPU launcher: tasks are spread over at::parallel_for, each runs the per-task code with one thread
// on a thread-local workspace.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <cstdlib>
#include <memory>
#include <tuple>
#include <vector>

#include "checks.h"
#include "fused_inner_loop.h"

namespace metafast {
namespace fused_inner_loop {
namespace {

// A per-thread workspace that only grows (no allocation per task or per call once warm).
template <typename T>
T* thread_workspace(int64_t n) {
  struct Buf {
    T* ptr = nullptr;
    int64_t cap = 0;
    ~Buf() { std::free(ptr); }
  };
  thread_local Buf buf;
  if (buf.cap < n) {
    std::free(buf.ptr);
    const size_t bytes = (static_cast<size_t>(n) * sizeof(T) + 63) / 64 * 64;
    buf.ptr = static_cast<T*>(std::aligned_alloc(64, bytes));
    TORCH_CHECK(buf.ptr != nullptr, "fused_inner_loop: out of memory for a ", bytes, "-byte task workspace");
    buf.cap = n;
  }
  return buf.ptr;
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

template <typename T>
T* mut_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

// The per-task code is compiled twice: for the baseline ISA of the build and, on x86 with GCC or
// clang, for AVX2 + FMA (picked at run time; about 1.5x faster on the sinusoid MLP). flatten inlines
// the whole task into the entry point, so every loop in it is compiled for that entry's ISA.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define MF_CPU_DISPATCH 1
#define MF_FLATTEN __attribute__((flatten))
#else
#define MF_FLATTEN
#endif

template <typename T>
MF_FLATTEN void forward_task_base(const Plan& p, const FwdTask<T>& a, T* ws) {
  forward_task(CpuExec{}, p, a, ws);
}
template <typename T>
MF_FLATTEN void backward_task_base(const Plan& p, const BwdTask<T>& a, bool first_order, T* ws) {
  backward_task(CpuExec{}, p, a, first_order, ws);
}

#ifdef MF_CPU_DISPATCH
template <typename T>
__attribute__((target("avx2,fma"), flatten)) void forward_task_avx2(const Plan& p, const FwdTask<T>& a, T* ws) {
  forward_task(CpuExec{}, p, a, ws);
}
template <typename T>
__attribute__((target("avx2,fma"), flatten)) void backward_task_avx2(const Plan& p, const BwdTask<T>& a,
                                                                    bool first_order, T* ws) {
  backward_task(CpuExec{}, p, a, first_order, ws);
}

bool cpu_has_avx2_fma() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#endif

template <typename T>
void run_forward_task(const Plan& p, const FwdTask<T>& a, T* ws) {
#ifdef MF_CPU_DISPATCH
  if (cpu_has_avx2_fma()) return forward_task_avx2(p, a, ws);
#endif
  forward_task_base(p, a, ws);
}

template <typename T>
void run_backward_task(const Plan& p, const BwdTask<T>& a, bool first_order, T* ws) {
#ifdef MF_CPU_DISPATCH
  if (cpu_has_avx2_fma()) return backward_task_avx2(p, a, first_order, ws);
#endif
  backward_task_base(p, a, first_order, ws);
}

}  // namespace

void forward_cpu(const Plan& p, const at::Tensor& theta, const at::Tensor& lr, const at::Tensor& sx,
                 const at::Tensor& sy, const at::Tensor& qx, const at::Tensor& qy, const at::Tensor& query_loss,
                 const at::Tensor& support_loss, const at::Tensor& fast, const at::Tensor& query_out,
                 const at::Tensor& saved) {
  const int64_t T = sx.size(0);
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "fused_inner_loop_cxx", [&] {
    using T_ = scalar_t;
    const int64_t ysz = p.loss_kind == kMSE ? static_cast<int64_t>(p.d[p.L]) : 1;
    const int64_t yel = p.loss_kind == kMSE ? static_cast<int64_t>(sizeof(T_)) : static_cast<int64_t>(sizeof(int64_t));
    const char* sy_b = static_cast<const char*>(sy.data_ptr());
    const char* qy_b = static_cast<const char*>(qy.data_ptr());
    const T_* theta_p = theta.data_ptr<T_>();
    const T_* lr_p = lr.data_ptr<T_>();
    const T_* sx_p = sx.data_ptr<T_>();
    const T_* qx_p = qx.data_ptr<T_>();
    T_* ql_p = query_loss.data_ptr<T_>();
    T_* sl_p = support_loss.data_ptr<T_>();
    T_* fast_p = fast.data_ptr<T_>();
    T_* qout_p = query_out.data_ptr<T_>();
    T_* saved_p = mut_or_null<T_>(saved);
    at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
      T_* ws = thread_workspace<T_>(p.size);
      for (int64_t t = begin; t < end; ++t) {
        FwdTask<T_> a;
        a.theta = theta_p;
        a.lr = lr_p;
        a.sx = sx_p + t * p.Ns * p.d[0];
        a.sy = sy_b + t * p.Ns * ysz * yel;
        a.qx = qx_p + t * p.Nq * p.d[0];
        a.qy = qy_b + t * p.Nq * ysz * yel;
        a.query_loss = ql_p + t;
        a.support_loss = sl_p + t;
        a.fast = fast_p + t * p.P;
        a.query_out = qout_p + t * p.Nq * p.d[p.L];
        a.saved = saved_p == nullptr ? nullptr : saved_p + t * p.K * p.P;
        run_forward_task(p, a, ws);
      }
    });
  });
}

void backward_cpu(const Plan& p, const at::Tensor& grad_query_loss, const at::Tensor& lr, const at::Tensor& sx,
                  const at::Tensor& sy, const at::Tensor& qx, const at::Tensor& qy, const at::Tensor& saved,
                  const at::Tensor& grad_theta_t, const at::Tensor& grad_lr_t, bool first_order) {
  const int64_t T = sx.size(0);
  AT_DISPATCH_FLOATING_TYPES(sx.scalar_type(), "fused_inner_loop_backward_cxx", [&] {
    using T_ = scalar_t;
    const int64_t ysz = p.loss_kind == kMSE ? static_cast<int64_t>(p.d[p.L]) : 1;
    const int64_t yel = p.loss_kind == kMSE ? static_cast<int64_t>(sizeof(T_)) : static_cast<int64_t>(sizeof(int64_t));
    const char* sy_b = static_cast<const char*>(sy.data_ptr());
    const char* qy_b = static_cast<const char*>(qy.data_ptr());
    const T_* gq_p = grad_query_loss.data_ptr<T_>();
    const T_* lr_p = lr.data_ptr<T_>();
    const T_* sx_p = sx.data_ptr<T_>();
    const T_* qx_p = qx.data_ptr<T_>();
    const T_* saved_p = saved.data_ptr<T_>();
    T_* gt_p = grad_theta_t.data_ptr<T_>();
    T_* glr_p = mut_or_null<T_>(grad_lr_t);
    at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
      T_* ws = thread_workspace<T_>(p.size);
      for (int64_t t = begin; t < end; ++t) {
        BwdTask<T_> a;
        a.gq = gq_p[t];
        a.lr = lr_p;
        a.sx = sx_p + t * p.Ns * p.d[0];
        a.sy = sy_b + t * p.Ns * ysz * yel;
        a.qx = qx_p + t * p.Nq * p.d[0];
        a.qy = qy_b + t * p.Nq * ysz * yel;
        a.saved = saved_p + t * p.K * p.P;
        a.grad_theta = gt_p + t * p.P;
        a.grad_lr = glr_p == nullptr ? nullptr : glr_p + t * p.P;
        run_backward_task(p, a, first_order, ws);
      }
    });
  });
}

namespace {

// Checks every argument against dims / steps / loss_kind and returns the plan.
Plan check_and_plan(const at::Tensor& theta, const at::Tensor& lr, const at::Tensor& sx, const at::Tensor& sy,
                    const at::Tensor& qx, const at::Tensor& qy, at::IntArrayRef dims, int64_t steps,
                    int64_t loss_kind, bool lr_per_param) {
  TORCH_CHECK(dims.size() >= 2 && dims.size() <= kMaxLayers + 1, "dims must list 2 to ", kMaxLayers + 1,
              " layer widths (1 to ", kMaxLayers, " linear layers), got ", dims);
  for (auto d : dims)
    TORCH_CHECK(d >= 1 && d <= kMaxDim, "dims: every width must lie in [1, ", kMaxDim, "], got ", dims);
  TORCH_CHECK(steps >= 1, "steps must be >= 1, got ", steps);
  TORCH_CHECK(loss_kind == kMSE || loss_kind == kCE, "loss_kind must be 0 (MSE) or 1 (cross-entropy), got ",
              loss_kind);
  TORCH_CHECK(theta.scalar_type() == at::kFloat || theta.scalar_type() == at::kDouble,
              "theta must be float32 or float64, got ", theta.scalar_type());
  const auto dt = theta.scalar_type();
  CHECK_DTYPE(lr, dt);
  CHECK_DTYPE(sx, dt);
  CHECK_DTYPE(qx, dt);
  if (loss_kind == kMSE) {
    CHECK_DTYPE(sy, dt);
    CHECK_DTYPE(qy, dt);
  } else {
    CHECK_DTYPE(sy, at::kLong);
    CHECK_DTYPE(qy, at::kLong);
  }
  for (const at::Tensor* t : {&lr, &sx, &sy, &qx, &qy})
    TORCH_CHECK(t->device() == theta.device(), "all tensors must be on theta's device ", theta.device(), ", got ",
                t->device());
  CHECK_CONTIGUOUS(theta);
  CHECK_CONTIGUOUS(lr);
  CHECK_CONTIGUOUS(sx);
  CHECK_CONTIGUOUS(sy);
  CHECK_CONTIGUOUS(qx);
  CHECK_CONTIGUOUS(qy);
  CHECK_DIM(sx, 3);
  CHECK_DIM(qx, 3);
  const int64_t T = sx.size(0), Ns = sx.size(1), Nq = qx.size(1), d0 = dims[0], dL = dims.back();
  TORCH_CHECK(sx.size(2) == d0, "sx must be [T, Ns, dims[0]] = [T, Ns, ", d0, "], got ", sx.sizes());
  TORCH_CHECK(qx.size(0) == T && qx.size(2) == d0, "qx must be [T, Nq, ", d0, "] with T = ", T, ", got ",
              qx.sizes());
  TORCH_CHECK(Ns >= 1 && Nq >= 1, "sx and qx need at least one row per task, got ", sx.sizes(), " and ",
              qx.sizes());
  TORCH_CHECK(Ns * dims.back() < (int64_t(1) << 31) && Nq * dims.back() < (int64_t(1) << 31) &&
                  Ns * 256 < (int64_t(1) << 31) && Nq * 256 < (int64_t(1) << 31),
              "sx / qx: too many rows per task");
  if (loss_kind == kMSE) {
    TORCH_CHECK(sy.dim() == 3 && sy.size(0) == T && sy.size(1) == Ns && sy.size(2) == dL,
                "sy must be [T, Ns, dims[-1]] = [", T, ", ", Ns, ", ", dL, "] for MSE, got ", sy.sizes());
    TORCH_CHECK(qy.dim() == 3 && qy.size(0) == T && qy.size(1) == Nq && qy.size(2) == dL,
                "qy must be [T, Nq, dims[-1]] = [", T, ", ", Nq, ", ", dL, "] for MSE, got ", qy.sizes());
  } else {
    TORCH_CHECK(sy.dim() == 2 && sy.size(0) == T && sy.size(1) == Ns, "sy must be [T, Ns] = [", T, ", ", Ns,
                "] int64 labels for cross-entropy, got ", sy.sizes());
    TORCH_CHECK(qy.dim() == 2 && qy.size(0) == T && qy.size(1) == Nq, "qy must be [T, Nq] = [", T, ", ", Nq,
                "] int64 labels for cross-entropy, got ", qy.sizes());
  }
  Plan p = make_plan(dims.data(), static_cast<int>(dims.size()), static_cast<int>(Ns), static_cast<int>(Nq),
                     static_cast<int>(steps), static_cast<int>(loss_kind), lr_per_param);
  CHECK_DIM(theta, 1);
  TORCH_CHECK(theta.numel() == p.P, "theta must have P = ", p.P, " elements for dims ", dims, ", got ",
              theta.numel());
  CHECK_DIM(lr, 1);
  if (lr_per_param) {
    TORCH_CHECK(lr.numel() == p.P, "lr must be [P] = [", p.P, "] when lr_per_param, got ", lr.sizes());
  } else {
    TORCH_CHECK(lr.numel() == steps, "lr must be [steps] = [", steps, "] when not lr_per_param, got ", lr.sizes());
  }
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_forward(
    const Plan& p, const at::Tensor& theta, const at::Tensor& lr, const at::Tensor& sx, const at::Tensor& sy,
    const at::Tensor& qx, const at::Tensor& qy, bool save) {
  const int64_t T = sx.size(0);
  const auto opt = theta.options();
  at::Tensor query_loss = at::empty({T}, opt);
  at::Tensor support_loss = at::empty({T}, opt);
  at::Tensor fast = at::empty({T, p.P}, opt);
  at::Tensor query_out = at::empty({T, p.Nq, p.d[p.L]}, opt);
  at::Tensor saved = save ? at::empty({T, p.K, p.P}, opt) : at::empty({0}, opt);
  if (T > 0) {
    if (theta.is_cuda())
      forward_cuda(p, theta, lr, sx, sy, qx, qy, query_loss, support_loss, fast, query_out, saved);
    else
      forward_cpu(p, theta, lr, sx, sy, qx, qy, query_loss, support_loss, fast, query_out, saved);
  }
  return {query_loss, support_loss, fast, query_out, saved};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_inner_loop_cxx(
    const at::Tensor& theta, const at::Tensor& lr, const at::Tensor& sx, const at::Tensor& sy, const at::Tensor& qx,
    const at::Tensor& qy, at::IntArrayRef dims, int64_t steps, int64_t loss_kind, bool lr_per_param,
    bool save_for_backward) {
  TORCH_CHECK(theta.is_cpu() || theta.is_cuda(), "theta must be a CPU or CUDA tensor, got ", theta.device());
  const Plan p = check_and_plan(theta, lr, sx, sy, qx, qy, dims, steps, loss_kind, lr_per_param);
  return run_forward(p, theta, lr, sx, sy, qx, qy, save_for_backward);
}

std::tuple<at::Tensor, at::Tensor> fused_inner_loop_backward_cxx(
    const at::Tensor& grad_query_loss, const at::Tensor& theta, const at::Tensor& lr, const at::Tensor& sx,
    const at::Tensor& sy, const at::Tensor& qx, const at::Tensor& qy, const at::Tensor& saved, at::IntArrayRef dims,
    int64_t steps, int64_t loss_kind, bool lr_per_param, bool first_order) {
  TORCH_CHECK(theta.is_cpu() || theta.is_cuda(), "theta must be a CPU or CUDA tensor, got ", theta.device());
  const Plan p = check_and_plan(theta, lr, sx, sy, qx, qy, dims, steps, loss_kind, lr_per_param);
  const int64_t T = sx.size(0);
  CHECK_DTYPE(grad_query_loss, theta.scalar_type());
  CHECK_CONTIGUOUS(grad_query_loss);
  TORCH_CHECK(grad_query_loss.device() == theta.device(), "grad_query_loss must be on ", theta.device(), ", got ",
              grad_query_loss.device());
  TORCH_CHECK(grad_query_loss.dim() == 1 && grad_query_loss.size(0) == T, "grad_query_loss must be [T] = [", T,
              "], got ", grad_query_loss.sizes());
  at::Tensor traj = saved;
  if (!saved.defined() || saved.numel() == 0) {
    // Nothing saved: recompute the trajectory W_0..W_{K-1}.
    traj = std::get<4>(run_forward(p, theta, lr, sx, sy, qx, qy, true));
  } else {
    CHECK_DTYPE(saved, theta.scalar_type());
    CHECK_CONTIGUOUS(saved);
    TORCH_CHECK(saved.device() == theta.device(), "saved must be on ", theta.device(), ", got ", saved.device());
    TORCH_CHECK(saved.dim() == 3 && saved.size(0) == T && saved.size(1) == steps && saved.size(2) == p.P,
                "saved must be empty or [T, steps, P] = [", T, ", ", steps, ", ", p.P, "], got ", saved.sizes());
  }
  const auto opt = theta.options();
  at::Tensor gt = at::empty({T, p.P}, opt);
  at::Tensor glr_t = lr_per_param ? at::empty({T, p.P}, opt) : at::Tensor();
  if (T > 0) {
    if (theta.is_cuda())
      backward_cuda(p, grad_query_loss, lr, sx, sy, qx, qy, traj, gt, glr_t, first_order);
    else
      backward_cpu(p, grad_query_loss, lr, sx, sy, qx, qy, traj, gt, glr_t, first_order);
  }
  // Per-task shares summed here (deterministic, unlike atomics across blocks).
  at::Tensor grad_theta = at::sum(gt, {0});
  at::Tensor grad_lr = lr_per_param ? at::sum(glr_t, {0}) : at::empty({0}, opt);
  return {grad_theta, grad_lr};
}

}  // namespace
}  // namespace fused_inner_loop
}  // namespace metafast

TORCH_LIBRARY_FRAGMENT(metafast, m) {
  // (query_loss [T], support_loss [T], fast [T, P], query_out [T, Nq, dL], saved [T, K, P] or empty)
  m.def(
      "fused_inner_loop_cxx(Tensor theta, Tensor lr, Tensor sx, Tensor sy, Tensor qx, Tensor qy, "
      "int[] dims, int steps, int loss_kind, bool lr_per_param, bool save_for_backward) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // (grad_theta [P], grad_lr [P] or empty); saved may be empty (the trajectory is recomputed).
  m.def(
      "fused_inner_loop_backward_cxx(Tensor grad_query_loss, Tensor theta, Tensor lr, Tensor sx, "
      "Tensor sy, Tensor qx, Tensor qy, Tensor saved, int[] dims, int steps, int loss_kind, "
      "bool lr_per_param, bool first_order) -> (Tensor, Tensor)");
}

// One implementation per op serves both keys: it checks, allocates and picks the launcher by device.
TORCH_LIBRARY_IMPL(metafast, CPU, m) {
  m.impl("fused_inner_loop_cxx", &metafast::fused_inner_loop::fused_inner_loop_cxx);
  m.impl("fused_inner_loop_backward_cxx", &metafast::fused_inner_loop::fused_inner_loop_backward_cxx);
}

TORCH_LIBRARY_IMPL(metafast, CUDA, m) {
  m.impl("fused_inner_loop_cxx", &metafast::fused_inner_loop::fused_inner_loop_cxx);
  m.impl("fused_inner_loop_backward_cxx", &metafast::fused_inner_loop::fused_inner_loop_backward_cxx);
}
