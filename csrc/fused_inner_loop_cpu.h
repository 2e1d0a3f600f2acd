// The CPU execution of the per-task code of fused_inner_loop.h: the scalar type is TaskVec<S>, a
// 32-byte SIMD vector holding one S of each of kW tasks (8 floats / 4 doubles), so a task group
// runs the per-task code once and every product, ReLU and update is one vector instruction for all
// of its tasks. No product has to be vectorized along a matrix row: the 1-wide layers of an MLP (its
// input and output) cost as much per task as a 40-wide one costs per column, there are no row tails,
// and there are no horizontal sums. Task t of a group lives in lane t of every vector; the launcher
// (fused_inner_loop_cpu.cpp) interleaves the inputs and de-interleaves the outputs.
#pragma once

#include <cstdint>

#include "fused_inner_loop.h"

namespace metafast {
namespace fused_inner_loop {

// Bytes of one task vector (one AVX2 register); the launcher's task groups and the saved buffer's
// layout follow from it.
constexpr int kTaskVecBytes = 32;

template <typename S>
struct TaskVec {
  static constexpr int kW = static_cast<int>(kTaskVecBytes / sizeof(S));
  // may_alias as for the x86 intrinsic types (the buffers are plain allocations); aligned: without
  // AVX enabled for the whole file, GCC would give the type only 16-byte alignment.
  typedef S V __attribute__((vector_size(kTaskVecBytes), __may_alias__, aligned(kTaskVecBytes)));
  V v;

  TaskVec() = default;
  TaskVec(S s) : v(V{} + s) {}  // every lane = s (also what T(0), static_cast<T>(n) mean)
  static TaskVec of(V x) {
    TaskVec r;
    r.v = x;
    return r;
  }
  TaskVec& operator+=(TaskVec o) { v += o.v; return *this; }
  TaskVec& operator-=(TaskVec o) { v -= o.v; return *this; }
  TaskVec& operator*=(TaskVec o) { v *= o.v; return *this; }
};

static_assert(alignof(TaskVec<float>) == kTaskVecBytes && sizeof(TaskVec<double>) == kTaskVecBytes,
              "TaskVec must be one vector of kTaskVecBytes");

template <typename S>
inline TaskVec<S> operator-(TaskVec<S> a) { return TaskVec<S>::of(-a.v); }
template <typename S>
inline TaskVec<S> operator+(TaskVec<S> a, TaskVec<S> b) { return TaskVec<S>::of(a.v + b.v); }
template <typename S>
inline TaskVec<S> operator-(TaskVec<S> a, TaskVec<S> b) { return TaskVec<S>::of(a.v - b.v); }
template <typename S>
inline TaskVec<S> operator*(TaskVec<S> a, TaskVec<S> b) { return TaskVec<S>::of(a.v * b.v); }
template <typename S>
inline TaskVec<S> operator/(TaskVec<S> a, TaskVec<S> b) { return TaskVec<S>::of(a.v / b.v); }

template <typename S>
inline TaskVec<S> relu_of(TaskVec<S> x) {
  using V = typename TaskVec<S>::V;
  return TaskVec<S>::of(x.v < V{} ? V{} : x.v);  // NaN stays NaN, as in torch.relu
}
template <typename S>
inline TaskVec<S> where_pos(TaskVec<S> m, TaskVec<S> x) {
  using V = typename TaskVec<S>::V;
  return TaskVec<S>::of(m.v > V{} ? x.v : V{});
}

// Cross-entropy rows lane by lane (each task has its own labels, y [N, kW]); the scalar ce_row.
template <typename Ex, typename S>
TaskVec<S> ce_rows(const Ex&, const TaskVec<S>* Z, const int64_t* y, int N, int C, TaskVec<S>* dz,
                   TaskVec<S>* prob, TaskVec<S> gs) {
  constexpr int W = TaskVec<S>::kW;
  S z[kMaxDim], d[kMaxDim], pr[kMaxDim];
  TaskVec<S> part(0);
  for (int n = 0; n < N; ++n) {
    const int64_t o = static_cast<int64_t>(n) * C;
    for (int w = 0; w < W; ++w) {
      for (int c = 0; c < C; ++c) z[c] = Z[o + c].v[w];
      part.v[w] += ce_row(z, C, static_cast<int>(y[static_cast<int64_t>(n) * W + w]), dz == nullptr ? nullptr : d,
                          prob == nullptr ? nullptr : pr, gs.v[w]);
      for (int c = 0; dz != nullptr && c < C; ++c) dz[o + c].v[w] = d[c];
      for (int c = 0; prob != nullptr && c < C; ++c) prob[o + c].v[w] = pr[c];
    }
  }
  return part;
}

// One thread runs a whole task group.
struct CpuExec {
  static constexpr int tid = 0;
  static constexpr int nthreads = 1;
  static constexpr int kLanes = 4;
  // work items of 3 rows x 4 columns: 12 independent FMA chains (the latency covered), each weight
  // vector loaded once for 3 rows, 16 vector registers in all (with 3 of A and one of B)
  template <typename T>
  static constexpr int vec() { return 4; }
  template <typename T>
  static constexpr int rows() { return 3; }
  void sync() const {}
  template <typename T>
  T sum(T v) const { return v; }
};

}  // namespace fused_inner_loop
}  // namespace metafast
