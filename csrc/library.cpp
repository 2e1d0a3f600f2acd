// metafast._C: loading this shared library registers the metafast::* CUDA ops with the dispatcher
// (they then appear under torch.ops.metafast). The Python module itself is empty.
//
// The inner_update kernels register here rather than in their .cu files: torch/library.h is slow
// to parse, and nvcc parses a .cu once per architecture.
//
// The ops here are raw CUDA kernels (CUDA dispatch key only, no autograd), named apart from the
// public, differentiable ops (e.g. metafast::inner_update_cuda vs metafast::inner_update) that the
// torch.library custom ops in metafast/ops/<op>.py define and implement by calling them. Other ops
// add schemas with TORCH_LIBRARY_FRAGMENT(metafast, m) next to their .cu file and implementations
// with TORCH_LIBRARY_IMPL(metafast, CUDA, m).
#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

#ifdef METAFAST_WITH_CUDA
#include "inner_update.h"
#endif

// The schemas of the raw CUDA ops exist only in a CUDA build, so that hasattr(torch.ops.metafast,
// "inner_update_cuda") tells whether the extension can run them.
TORCH_LIBRARY(metafast, m) {
#ifdef METAFAST_WITH_CUDA
  // fast[t, p] = theta[p or t, p] - lr[p or scalar] * scale[t] * grad[t, p]; lr is the tensor `lr`
  // ([P] or 0-d) when given, else `lr_scalar`. scale[t] = min(1, max_norm / (||grad[t]|| + 1e-6))
  // when max_norm is given, else 1.
  m.def("inner_update_cuda(Tensor theta, Tensor grad, Tensor? lr, float lr_scalar, float? max_norm) -> Tensor");
  // Gradients of sum(grad_out * fast): (d_grad [T, P], d_theta [P] summed over tasks, d_lr shaped like
  // lr). Each is an empty tensor unless its flag asks for it (d_theta: theta was broadcast).
  m.def(
      "inner_update_backward_cuda(Tensor grad_out, Tensor grad, Tensor? lr, float lr_scalar, float? max_norm, "
      "bool need_grad, bool need_theta, bool need_lr) -> (Tensor, Tensor, Tensor)");
  // One task over a list of tensors: out[i] = params[i] - lr_i * scale * grads[i], lr_i = lrs[i]
  // (shaped like params[i], or 0-d) or lr_scalar when lrs is empty; the clip norm is global.
  m.def(
      "inner_update_multi_cuda(Tensor[] params, Tensor[] grads, Tensor[] lrs, float lr_scalar, float? max_norm) "
      "-> Tensor[]");
  // (d_grads, d_lrs), each an empty list unless its flag asks for it.
  m.def(
      "inner_update_multi_backward_cuda(Tensor[] grad_outs, Tensor[] grads, Tensor[] lrs, float lr_scalar, "
      "float? max_norm, bool need_grad, bool need_lr) -> (Tensor[], Tensor[])");
#endif
}

#ifdef METAFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(metafast, CUDA, m) {
  m.impl("inner_update_cuda", &metafast::inner_update::inner_update_cuda);
  m.impl("inner_update_backward_cuda", &metafast::inner_update::inner_update_backward_cuda);
  m.impl("inner_update_multi_cuda", &metafast::inner_update::inner_update_multi_cuda);
  m.impl("inner_update_multi_backward_cuda", &metafast::inner_update::inner_update_multi_backward_cuda);
}
#endif

// metafast._C.build_info(): what this binary was compiled with (read by metafast/_ext_info.py, which
// `metafast info` reports): {"cuda": bool, "cuda_version": str ("" without CUDA), "torch": "X.Y.Z"
// of the headers it was compiled against, "cxx11_abi": bool, "openmp": bool}.
#define METAFAST_STR_(x) #x
#define METAFAST_STR(x) METAFAST_STR_(x)

static PyObject* build_info(PyObject*, PyObject*) {
#ifdef METAFAST_WITH_CUDA
  const bool cuda = true;
  const char* cuda_version = METAFAST_STR(METAFAST_CUDA_VERSION);
#else
  const bool cuda = false;
  const char* cuda_version = "";
#endif
#ifdef _OPENMP
  const bool openmp = true;
#else
  const bool openmp = false;
#endif
  const char* torch_version =
      METAFAST_STR(TORCH_VERSION_MAJOR) "." METAFAST_STR(TORCH_VERSION_MINOR) "." METAFAST_STR(TORCH_VERSION_PATCH);
  return Py_BuildValue("{s:O,s:s,s:s,s:O,s:O}", "cuda", cuda ? Py_True : Py_False, "cuda_version", cuda_version,
                       "torch", torch_version, "cxx11_abi", _GLIBCXX_USE_CXX11_ABI ? Py_True : Py_False, "openmp",
                       openmp ? Py_True : Py_False);
}

extern "C" {
// `import metafast._C` only needs a module object (the ops are registered by the static
// initialisers above when the library is loaded) and build_info().
PyMODINIT_FUNC PyInit__C(void) {
  static PyMethodDef methods[] = {
      {"build_info", build_info, METH_NOARGS, "What metafast._C was compiled with (CUDA, torch headers, ABI)."},
      {nullptr, nullptr, 0, nullptr}};
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}
