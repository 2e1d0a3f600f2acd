// metafast::fused_inner_loop_cxx / fused_inner_loop_backward_cxx: the whole MAML inner loop of an MLP
// and its exact reverse (see fused_inner_loop.h), as raw ops (no autograd) for the CPU and CUDA
// dispatch keys. This file holds the schemas, the argument checks shared by both devices, and the
// CPU launcher: task groups (one task per SIMD lane, fused_inner_loop_cpu.h) are spread over
// at::parallel_for, each runs the per-task code with one thread on a thread-local workspace.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <tuple>
#include <vector>

#include "checks.h"
#include "fused_inner_loop_cpu.h"

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
T* mut_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

// Lanes of a task group: task t0 + w in lane w; lanes past the last task repeat it (their results
// are dropped), so every lane computes on valid data.
inline int64_t lane_task(int64_t t0, int w, int64_t T) { return t0 + w < T ? t0 + w : T - 1; }

// dst[i] lane w = src[task(w) * stride + i] for i < n, read from W sequential streams. Lane by lane
// into dst's memory (TaskVec may alias its scalars): a vector assembled on the stack and reloaded
// stalls on store forwarding in the baseline-ISA build of this file.
template <typename S>
void gather(TaskVec<S>* dst, const S* src, int64_t n, int64_t stride, int64_t t0, int64_t T) {
  constexpr int W = TaskVec<S>::kW;
  const S* s[W];
  for (int w = 0; w < W; ++w) s[w] = src + lane_task(t0, w, T) * stride;
  S* d = reinterpret_cast<S*>(dst);
  for (int64_t i = 0; i < n; ++i)
    for (int w = 0; w < W; ++w) d[i * W + w] = s[w][i];
}

// int64 labels into [n, W]
inline void gather_labels(int64_t* dst, const int64_t* src, int64_t n, int64_t stride, int64_t t0, int64_t T, int W) {
  for (int w = 0; w < W; ++w) {
    const int64_t* s = src + lane_task(t0, w, T) * stride;
    for (int64_t i = 0; i < n; ++i) dst[i * W + w] = s[i];
  }
}

// dst[task(w) * stride + i] = src[i] lane w, for the group's real tasks only: one vector load per i,
// written to W sequential streams.
template <typename S>
void scatter(S* dst, const TaskVec<S>* src, int64_t n, int64_t stride, int64_t t0, int64_t T) {
  constexpr int W = TaskVec<S>::kW;
  const int nw = T - t0 < W ? static_cast<int>(T - t0) : W;
  S* d[W];
  for (int w = 0; w < nw; ++w) d[w] = dst + (t0 + w) * stride;
  const S* s = reinterpret_cast<const S*>(src);
  for (int64_t i = 0; i < n; ++i)
    for (int w = 0; w < nw; ++w) d[w][i] = s[i * W + w];
}

// dst[i] = sum of src[i] over the group's real tasks, in lane order (deterministic)
template <typename S>
void sum_lanes(S* dst, const TaskVec<S>* src, int64_t n, int64_t t0, int64_t T) {
  constexpr int W = TaskVec<S>::kW;
  const int nw = T - t0 < W ? static_cast<int>(T - t0) : W;
  for (int64_t i = 0; i < n; ++i) {
    S acc = S(0);
    for (int w = 0; w < nw; ++w) acc += src[i].v[w];
    dst[i] = acc;
  }
}

// dst[i] = src[i] in every lane (theta, lr: the same for every task); lane stores as in gather (the
// TaskVec(S) form was a sixth of the sinusoid forward in the baseline-ISA build)
template <typename S>
void broadcast(TaskVec<S>* dst, const S* src, int64_t n) {
  constexpr int W = TaskVec<S>::kW;
  S* d = reinterpret_cast<S*>(dst);
  for (int64_t i = 0; i < n; ++i)
    for (int w = 0; w < W; ++w) d[i * W + w] = src[i];
}

// A group's interleaved inputs (and outputs), after the task workspace in the same buffer.
template <typename S>
struct GroupIO {
  TaskVec<S> *sx, *qx, *sy, *qy;  // sy / qy: MSE targets (CE labels go to the int64 buffer)
  TaskVec<S> *a, *c;              // fast / grad_theta [P]; query_out / grad_lr
  TaskVec<S> *loss;               // [2]
  TaskVec<S> *theta, *lr;         // broadcast [P], [K] or [P]
  int64_t *sl, *ql;               // CE labels [Ns, kW], [Nq, kW]
  TaskVec<S>* ws;

  GroupIO(const Plan& p) {
    const int64_t dL = p.d[p.L], mse = p.loss_kind == kMSE;
    const int64_t n[] = {p.Ns * p.d[0], p.Nq * p.d[0], mse * p.Ns * dL, mse * p.Nq * dL, p.P,
                         p.Nq * dL > p.P ? p.Nq * dL : p.P, 2, p.P,
                         p.lr_per_param ? p.P : p.K};
    int64_t total = p.size;
    for (int64_t x : n) total += align_up(x);
    ws = thread_workspace<TaskVec<S>>(total);
    TaskVec<S>* at = ws + p.size;
    TaskVec<S>** dst[] = {&sx, &qx, &sy, &qy, &a, &c, &loss, &theta, &lr};
    for (int i = 0; i < 9; ++i) {
      *dst[i] = at;
      at += align_up(n[i]);
    }
    const int64_t nl = mse ? 0 : (p.Ns + p.Nq) * TaskVec<S>::kW;
    sl = thread_workspace<int64_t>(nl > 0 ? nl : 1);
    ql = sl + p.Ns * TaskVec<S>::kW;
  }

  // A group's N-row set x / y (MSE targets or CE labels) into x_dst and y_dst / labels, interleaved;
  // task slices x[t], y[t] are contiguous, any stride apart.
  void load_set(const Plan& p, int64_t N, const at::Tensor& x, const at::Tensor& y, TaskVec<S>* x_dst,
                TaskVec<S>* y_dst, int64_t* labels, int64_t t0, int64_t T) {
    const int64_t d0 = p.d[0], dL = p.d[p.L];
    gather(x_dst, x.data_ptr<S>(), N * d0, x.stride(0), t0, T);
    if (p.loss_kind == kMSE)
      gather(y_dst, y.data_ptr<S>(), N * dL, y.stride(0), t0, T);
    else
      gather_labels(labels, y.data_ptr<int64_t>(), N, y.stride(0), t0, T, TaskVec<S>::kW);
  }
  void load_support(const Plan& p, const at::Tensor& sx_t, const at::Tensor& sy_t, int64_t t0, int64_t T) {
    load_set(p, p.Ns, sx_t, sy_t, sx, sy, sl, t0, T);
  }
  void load_query(const Plan& p, const at::Tensor& qx_t, const at::Tensor& qy_t, int64_t t0, int64_t T) {
    load_set(p, p.Nq, qx_t, qy_t, qx, qy, ql, t0, T);
  }
  const void* support_y(const Plan& p) const { return p.loss_kind == kMSE ? static_cast<const void*>(sy) : sl; }
  const void* query_y(const Plan& p) const { return p.loss_kind == kMSE ? static_cast<const void*>(qy) : ql; }
};

// Task groups of the CPU launcher: one task vector's worth of tasks each (fused_inner_loop_cpu.h).
int64_t cpu_lanes(const at::Tensor& theta) { return kTaskVecBytes / static_cast<int64_t>(theta.element_size()); }
int64_t cpu_groups(int64_t T, const at::Tensor& theta) { return (T + cpu_lanes(theta) - 1) / cpu_lanes(theta); }

// Task groups per parallel chunk: a chunk under ~128k multiply-adds (~30 microseconds) gains less
// from a second thread than OpenMP's fork and join cost. The 25-task sinusoid step (4 groups of ~211k)
// takes 223 -> 141 us on 2 threads with one group per chunk allowed, against all 4 in one chunk.
int64_t group_grain(const Plan& p) {
  const int64_t work = 3 * p.P * (p.K + 1) * (static_cast<int64_t>(p.Ns) + p.Nq);
  return std::max<int64_t>(1, (int64_t(1) << 17) / std::max<int64_t>(work, 1));
}

// The per-task code is compiled twice: for the baseline ISA of the build and, on x86 with GCC or
// clang, for AVX2 + FMA (picked at run time). flatten inlines the whole task into the entry point, so
// every loop in it is compiled for that entry's ISA.
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
    using S = scalar_t;
    using V = TaskVec<S>;
    S* ql_p = query_loss.data_ptr<S>();
    S* sl_p = support_loss.data_ptr<S>();
    S* fast_p = mut_or_null<S>(fast);
    S* qout_p = query_out.data_ptr<S>();
    S* saved_p = mut_or_null<S>(saved);
    const int64_t nout = p.Nq * p.d[p.L];
    at::parallel_for(0, cpu_groups(T, sx), group_grain(p), [&](int64_t begin, int64_t end) {
      GroupIO<S> io(p);
      broadcast(io.theta, theta.data_ptr<S>(), p.P);
      broadcast(io.lr, lr.data_ptr<S>(), lr.numel());
      for (int64_t g = begin; g < end; ++g) {
        const int64_t t0 = g * V::kW;
        io.load_support(p, sx, sy, t0, T);
        io.load_query(p, qx, qy, t0, T);
        FwdTask<V> a;
        a.theta = io.theta;
        a.lr = io.lr;
        a.sx = io.sx;
        a.sy = io.support_y(p);
        a.qx = io.qx;
        a.qy = io.query_y(p);
        a.query_loss = io.loss;
        a.support_loss = io.loss + 1;
        a.fast = fast_p == nullptr ? nullptr : io.a;
        // saved stays in the group's lane layout: only this op's backward reads it
        a.saved = saved_p == nullptr ? nullptr : reinterpret_cast<V*>(saved_p) + g * p.saved_size;
        a.query_out = io.c;
        run_forward_task(p, a, io.ws);
        scatter(ql_p, io.loss, 1, 1, t0, T);
        scatter(sl_p, io.loss + 1, 1, 1, t0, T);
        if (fast_p != nullptr) scatter(fast_p, io.a, p.P, p.P, t0, T);
        scatter(qout_p, io.c, nout, nout, t0, T);
      }
    });
  });
}

void backward_cpu(const Plan& p, const at::Tensor& grad_query_loss, const at::Tensor& theta, const at::Tensor& lr,
                  const at::Tensor& sx, const at::Tensor& sy, const at::Tensor& saved,
                  const at::Tensor& grad_theta_t, const at::Tensor& grad_lr_t, bool first_order) {
  const int64_t T = sx.size(0);
  AT_DISPATCH_FLOATING_TYPES(sx.scalar_type(), "fused_inner_loop_backward_cxx", [&] {
    using S = scalar_t;
    using V = TaskVec<S>;
    const S* gq_p = grad_query_loss.data_ptr<S>();
    const S* saved_p = saved.data_ptr<S>();
    S* gt_p = grad_theta_t.data_ptr<S>();
    S* glr_p = mut_or_null<S>(grad_lr_t);
    at::parallel_for(0, cpu_groups(T, sx), group_grain(p), [&](int64_t begin, int64_t end) {
      GroupIO<S> io(p);
      broadcast(io.theta, theta.data_ptr<S>(), p.P);
      broadcast(io.lr, lr.data_ptr<S>(), lr.numel());
      for (int64_t g = begin; g < end; ++g) {
        const int64_t t0 = g * V::kW;
        io.load_support(p, sx, sy, t0, T);  // the query set's part is in saved
        V gq(gq_p[0]);
        if (grad_query_loss.numel() > 1) gather(&gq, gq_p, 1, 1, t0, T);
        BwdTask<V> a;
        a.gq = gq;
        a.theta = io.theta;
        a.lr = io.lr;
        a.sx = io.sx;
        a.sy = io.support_y(p);
        a.saved = reinterpret_cast<const V*>(saved_p) + g * p.saved_size;
        a.grad_theta = io.a;
        a.grad_lr = glr_p == nullptr ? nullptr : io.c;
        run_backward_task(p, a, first_order, io.ws);
        sum_lanes(gt_p + g * p.P, io.a, p.P, t0, T);
        if (glr_p != nullptr) sum_lanes(glr_p + g * p.P, io.c, p.P, t0, T);
      }
    });
    // the groups' shares into the first row, in group order (deterministic; cheaper than an op)
    const int64_t groups = cpu_groups(T, sx);
    for (S* d : {gt_p, glr_p})
      for (int64_t g = 1; d != nullptr && g < groups; ++g)
        for (int64_t i = 0; i < p.P; ++i) d[i] += d[g * p.P + i];
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
  CHECK_TASK_SLICES(sx);
  CHECK_TASK_SLICES(sy);
  CHECK_TASK_SLICES(qx);
  CHECK_TASK_SLICES(qy);
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

// Elements of the opaque saved buffer: saved_size per task, in tasks on CUDA and in whole task
// groups (lane-interleaved, fused_inner_loop_cpu.h) on the CPU.
int64_t saved_numel(const Plan& p, int64_t T, const at::Tensor& theta) {
  if (theta.is_cuda()) return T * p.saved_size;
  return cpu_groups(T, theta) * cpu_lanes(theta) * p.saved_size;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_forward(
    const Plan& p, const at::Tensor& theta, const at::Tensor& lr, const at::Tensor& sx, const at::Tensor& sy,
    const at::Tensor& qx, const at::Tensor& qy, bool save, bool need_fast = true) {
  const int64_t T = sx.size(0);
  const auto opt = theta.options();
  at::Tensor query_loss = at::empty({T}, opt);
  at::Tensor support_loss = at::empty({T}, opt);
  at::Tensor fast = at::empty({need_fast ? T : 0, p.P}, opt);
  at::Tensor query_out = at::empty({T, p.Nq, p.d[p.L]}, opt);
  at::Tensor saved = at::empty({save ? saved_numel(p, T, theta) : 0}, opt);
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
    bool save_for_backward, bool need_fast) {
  TORCH_CHECK(theta.is_cpu() || theta.is_cuda(), "theta must be a CPU or CUDA tensor, got ", theta.device());
  const Plan p = check_and_plan(theta, lr, sx, sy, qx, qy, dims, steps, loss_kind, lr_per_param);
  return run_forward(p, theta, lr, sx, sy, qx, qy, save_for_backward, need_fast);
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
  TORCH_CHECK(grad_query_loss.dim() == 1 && (grad_query_loss.size(0) == T || grad_query_loss.size(0) == 1),
              "grad_query_loss must be [T] = [", T, "], or [1] for one value for every task, got ",
              grad_query_loss.sizes());
  at::Tensor traj = saved;
  if (!saved.defined() || saved.numel() == 0) {
    // Nothing saved: run the forward again for what it saves.
    traj = std::get<4>(run_forward(p, theta, lr, sx, sy, qx, qy, true));
  } else {
    CHECK_DTYPE(saved, theta.scalar_type());
    CHECK_CONTIGUOUS(saved);
    TORCH_CHECK(saved.device() == theta.device(), "saved must be on ", theta.device(), ", got ", saved.device());
    TORCH_CHECK(saved.dim() == 1 && saved.numel() == saved_numel(p, T, theta),
                "saved must be empty or the forward's saved output for these shapes (", saved_numel(p, T, theta),
                " elements), got ", saved.sizes());
  }
  const auto opt = theta.options();
  // per-task shares on CUDA, per task group on the CPU (its launcher sums a group's lanes, then the
  // groups into the first row)
  const int64_t rows = theta.is_cuda() ? T : cpu_groups(T, theta);
  at::Tensor gt = at::empty({rows, p.P}, opt);
  at::Tensor glr_t = lr_per_param ? at::empty({rows, p.P}, opt) : at::Tensor();
  if (T > 0) {
    if (theta.is_cuda())
      backward_cuda(p, grad_query_loss, theta, lr, sx, sy, traj, gt, glr_t, first_order);
    else
      backward_cpu(p, grad_query_loss, theta, lr, sx, sy, traj, gt, glr_t, first_order);
  }
  // CUDA's shares summed here (deterministic, unlike atomics across blocks).
  auto total = [&](const at::Tensor& shares) { return theta.is_cuda() ? at::sum(shares, {0}) : shares[0]; };
  at::Tensor grad_theta = T > 0 ? total(gt) : at::zeros({p.P}, opt);
  at::Tensor grad_lr = !lr_per_param ? at::empty({0}, opt) : T > 0 ? total(glr_t) : at::zeros({p.P}, opt);
  return {grad_theta, grad_lr};
}

}  // namespace
}  // namespace fused_inner_loop
}  // namespace metafast

TORCH_LIBRARY_FRAGMENT(metafast, m) {
  // (query_loss [T], support_loss [T], fast [T, P] (or [0, P] without need_fast), query_out [T, Nq, dL],
  // saved or empty); saved is a 1-D buffer for the backward: per task the trajectory W_1..W_{K-1} and
  // the last inner step's tape (see Plan), laid out as the device's kernel runs tasks.
  m.def(
      "fused_inner_loop_cxx(Tensor theta, Tensor lr, Tensor sx, Tensor sy, Tensor qx, Tensor qy, "
      "int[] dims, int steps, int loss_kind, bool lr_per_param, bool save_for_backward, bool need_fast=True) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // (grad_theta [P], grad_lr [P] or empty); saved may be empty (the forward is run again);
  // grad_query_loss is [T], or [1] for one value for every task.
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

#ifdef METAFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(metafast, CUDA, m) {
  m.impl("fused_inner_loop_cxx", &metafast::fused_inner_loop::fused_inner_loop_cxx);
  m.impl("fused_inner_loop_backward_cxx", &metafast::fused_inner_loop::fused_inner_loop_backward_cxx);
}
#else
// A CPU-only build (setup.py without nvcc or a CUDA torch) has no fused_inner_loop.cu: the ops are
// registered for the CPU key only, so the dispatcher never sends a CUDA tensor here; these stand in
// for the missing launchers so that the library links.
namespace metafast {
namespace fused_inner_loop {
void forward_cuda(const Plan&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                  const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                  const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "metafast._C was built without CUDA (no nvcc or a CPU-only torch at build time)");
}
void backward_cuda(const Plan&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                   const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool) {
  TORCH_CHECK(false, "metafast._C was built without CUDA (no nvcc or a CPU-only torch at build time)");
}
}  // namespace fused_inner_loop
}  // namespace metafast
#endif
