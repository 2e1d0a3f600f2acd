// Host launchers of the inner_update CUDA kernels (inner_update.cu, inner_update_multi.cu); the
// schemas and their registration are in library.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

namespace metafast {
namespace inner_update {

at::Tensor inner_update_cuda(const at::Tensor& theta, const at::Tensor& grad, const std::optional<at::Tensor>& lr,
                             double lr_scalar, std::optional<double> max_norm);

std::tuple<at::Tensor, at::Tensor, at::Tensor> inner_update_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& grad, const std::optional<at::Tensor>& lr, double lr_scalar,
    std::optional<double> max_norm, bool need_grad, bool need_theta, bool need_lr);

std::vector<at::Tensor> inner_update_multi_cuda(at::TensorList params, at::TensorList grads, at::TensorList lrs,
                                                double lr_scalar, std::optional<double> max_norm);

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> inner_update_multi_backward_cuda(
    at::TensorList grad_outs, at::TensorList grads, at::TensorList lrs, double lr_scalar,
    std::optional<double> max_norm, bool need_grad, bool need_lr);

}  // namespace inner_update
}  // namespace metafast
