// Argument checks shared by the launchers. Each message names the argument (its C++ name, which is
// the schema's argument name) and says what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define CHECK_CUDA(x) \
  TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor, got a tensor on ", (x).device())

#define CHECK_CONTIGUOUS(x) \
  TORCH_CHECK((x).is_contiguous(), #x " must be contiguous, got strides ", (x).strides())

#define CHECK_INPUT(x) \
  CHECK_CUDA(x);       \
  CHECK_CONTIGUOUS(x)

#define CHECK_DTYPE(x, dtype) \
  TORCH_CHECK((x).scalar_type() == (dtype), #x " must have dtype ", (dtype), ", got ", (x).scalar_type())

// float16 / bfloat16 / float32 / float64: what the kernels are instantiated for.
#define CHECK_FLOATING(x)                                                                          \
  TORCH_CHECK((x).scalar_type() == at::kHalf || (x).scalar_type() == at::kBFloat16 ||             \
                  (x).scalar_type() == at::kFloat || (x).scalar_type() == at::kDouble,            \
              #x " must be float16, bfloat16, float32 or float64, got ", (x).scalar_type())

#define CHECK_DIM(x, d) \
  TORCH_CHECK((x).dim() == (d), #x " must be a ", (d), "-D tensor, got shape ", (x).sizes())

#define CHECK_SAME_DEVICE(x, y) \
  TORCH_CHECK((x).device() == (y).device(), #x " must be on ", (y).device(), " like " #y ", got ", (x).device())

namespace metafast {
// Whether each x[t] (t along dim 0) is one contiguous block, whatever the stride between them: e.g.
// support and query sets sliced from one [T, N, ...] tensor.
inline bool task_slices_contiguous(const at::Tensor& x) {
  int64_t expected = 1;
  for (int64_t d = x.dim() - 1; d >= 1; --d) {
    if (x.size(d) != 1 && x.stride(d) != expected) return false;
    expected *= x.size(d);
  }
  return true;
}
}  // namespace metafast

// CUDA: contiguous; CPU: each task's slice contiguous (the CPU launchers read task by task).
#define CHECK_TASK_SLICES(x)                                                                            \
  TORCH_CHECK((x).is_cuda() ? (x).is_contiguous() : metafast::task_slices_contiguous(x), #x " must be " \
              "contiguous (on the CPU, each task's slice " #x "[t]), got strides ", (x).strides())
