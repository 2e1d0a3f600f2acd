// Helpers of the per-channel CPU kernels over [N, C, *spatial] maps (batch_norm_cpu.cpp,
// batch_norm_rop_cpu.cpp): one task per channel, whose N * S elements stay in cache across its passes.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

namespace metafast {
namespace channel_maps {

// x viewed as [N, C, S]: channel c of sample n is S contiguous elements at (n * C + c) * S.
struct Shape {
  int64_t N, C, S;
};

// A contiguous float32 / float64 CPU map [N, C, *spatial]; with ``like``, of its shape and dtype.
inline Shape check_map(const at::Tensor& x, const char* name, const at::Tensor* like) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor, got one on ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 2, name, " must be [N, C, *spatial], got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), name, " must be contiguous, got strides ", x.strides());
  if (like != nullptr) {
    TORCH_CHECK(x.sizes() == like->sizes(), name, " must have x's shape ", like->sizes(), ", got ", x.sizes());
    TORCH_CHECK(x.scalar_type() == like->scalar_type(), name, " must have x's dtype ", like->scalar_type(),
                ", got ", x.scalar_type());
  }
  const int64_t nc = x.size(0) * x.size(1);
  return {x.size(0), x.size(1), nc == 0 ? 0 : x.numel() / nc};
}

inline bool given(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// A per-channel vector [C] as float64 (they are C-long: converting costs nothing next to the maps);
// ``fill`` everywhere when not given.
inline std::vector<double> channel_vec(const c10::optional<at::Tensor>& t, const char* name, int64_t C, double fill) {
  std::vector<double> v(C, fill);
  if (!given(t)) return v;
  TORCH_CHECK(t->device().is_cpu(), name, " must be a CPU tensor, got one on ", t->device());
  TORCH_CHECK(t->numel() == C, name, " must have C = ", C, " elements, got shape ", t->sizes());
  at::Tensor d = t->to(at::kDouble).contiguous();
  const double* p = d.data_ptr<double>();
  for (int64_t c = 0; c < C; ++c) v[c] = p[c];
  return v;
}

// Channels per task: at least ~32k elements of work each, so small maps do not pay a thread per channel.
inline int64_t grain(const Shape& s) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, s.N * s.S)); }

// The loops vectorize (omp simd) to the build's baseline ISA (SSE2 on x86-64); AVX2/FMA copies of them,
// picked at run time with this, run 4 float64 lanes wide.
inline bool cpu_has_avx2_fma() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

}  // namespace channel_maps
}  // namespace metafast
