// metafast::fused_inner_loop_autograd: the eager, differentiable form of fused_inner_loop_cxx as one
// C++ autograd node. A Python autograd.Function, a separate node turning the flat parameter buffer
// into per-parameter gradients, and a mean node cost about as much as the whole fused sinusoid
// meta-step on the CPU; here the backward runs without Python and writes the gradient of every
// parameter tensor directly.
//
// theta is the flat [P] buffer that `params` are views of (metafast.functional.flat.FlatParams; a
// lone differentiable theta passes itself as params = [theta]). Outputs: (mean query loss, query
// loss [T], support loss [T], fast [T, P] ([0, P] unless need_fast), query out [T, Nq, dL]); the
// first two are differentiable w.r.t. params and, with lr_per_param, lr. CPU inputs whose task slices
// are contiguous are read in place.
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "checks.h"

namespace metafast {
namespace fused_inner_loop {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr const char* kSecondOrder =
    "fused_inner_loop: the meta-gradient supports one backward; second derivatives through it "
    "(create_graph=True followed by another backward) are not supported";

using FwdOp = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, at::IntArrayRef, int64_t, int64_t, bool, bool, bool);
using BwdOp = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&, const at::Tensor&, at::IntArrayRef, int64_t,
                                                 int64_t, bool, bool);

// Through the dispatcher, so that the device picks the CPU or CUDA kernel.
const c10::TypedOperatorHandle<FwdOp>& fwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("metafast::fused_inner_loop_cxx", "").typed<FwdOp>();
  return op;
}
const c10::TypedOperatorHandle<BwdOp>& bwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("metafast::fused_inner_loop_backward_cxx", "").typed<BwdOp>();
  return op;
}

// Identity whose backward raises: what create_graph=True returns, so that a second backward fails
// loudly instead of silently missing the third-order terms. `anchor` (a parameter, which requires
// grad) puts the outputs on the graph.
struct NoSecondOrder : public torch::autograd::Function<NoSecondOrder> {
  static variable_list forward(AutogradContext*, const at::Tensor& anchor, at::TensorList xs) {
    variable_list out;
    for (const at::Tensor& x : xs) out.push_back(x.clone());
    return out;
  }
  static variable_list backward(AutogradContext*, variable_list) { TORCH_CHECK(false, kSecondOrder); }
};

// x.mean() of a 1-D tensor, summed in double on the CPU: a reduction op's dispatch costs more than
// the sum of a meta-batch's losses
at::Tensor mean_of(const at::Tensor& x) {
  if (x.is_cuda() || x.numel() == 0) return x.mean();
  at::Tensor out = at::empty({}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mean_of", [&] {
    const scalar_t* p = x.data_ptr<scalar_t>();
    double s = 0;
    for (int64_t i = 0; i < x.numel(); ++i) s += static_cast<double>(p[i]);
    *out.data_ptr<scalar_t>() = static_cast<scalar_t>(s / static_cast<double>(x.numel()));
  });
  return out;
}

// (x * a) as a [1] tensor of x's dtype, x one element (by hand on the CPU, as mean_of)
at::Tensor scaled(const at::Tensor& x, double a) {
  if (x.is_cuda()) return x.mul(a).reshape({1});
  at::Tensor out = at::empty({1}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "scaled", [&] {
    *out.data_ptr<scalar_t>() = static_cast<scalar_t>(static_cast<double>(x.item<scalar_t>()) * a);
  });
  return out;
}

struct FusedInnerLoopFn : public torch::autograd::Function<FusedInnerLoopFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& theta, at::TensorList params,
                               const at::Tensor& lr, const at::Tensor& sx, const at::Tensor& sy, const at::Tensor& qx,
                               const at::Tensor& qy, at::IntArrayRef dims, int64_t steps, int64_t loss_kind,
                               bool lr_per_param, bool first_order, bool save, bool need_fast) {
    at::Tensor query_loss, support_loss, fast, query_out, saved;
    std::tie(query_loss, support_loss, fast, query_out, saved) =
        fwd_op().call(theta, lr, sx, sy, qx, qy, dims, steps, loss_kind, lr_per_param, save, need_fast);
    at::Tensor mean = mean_of(query_loss);
    if (save) {
      ctx->save_for_backward({theta, lr, sx, sy, qx, qy, saved, params[0]});
      std::vector<int64_t> numels, shapes, ranks;
      for (const at::Tensor& p : params) {
        numels.push_back(p.numel());
        ranks.push_back(p.dim());
        for (int64_t s : p.sizes()) shapes.push_back(s);
      }
      ctx->saved_data["dims"] = dims.vec();
      ctx->saved_data["cfg"] = std::vector<int64_t>{steps, loss_kind, lr_per_param, first_order};
      ctx->saved_data["numels"] = numels;
      ctx->saved_data["shapes"] = shapes;
      ctx->saved_data["ranks"] = ranks;
    }
    ctx->mark_non_differentiable({support_loss, fast, query_out});
    ctx->set_materialize_grads(false);  // no zero [T, P] gradient for `fast`
    return {mean, query_loss, support_loss, fast, query_out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &theta = saved[0], &lr = saved[1], &sx = saved[2];
    const auto dims = ctx->saved_data["dims"].toIntVector();
    const auto cfg = ctx->saved_data["cfg"].toIntVector();
    const auto numels = ctx->saved_data["numels"].toIntVector();
    const auto shapes = ctx->saved_data["shapes"].toIntVector();
    const auto ranks = ctx->saved_data["ranks"].toIntVector();
    const bool lr_per_param = cfg[2] != 0;
    const size_t n_params = numels.size();
    // forward inputs: theta, params..., lr, sx, sy, qx, qy and seven non-tensor arguments
    variable_list out(1 + n_params + 1 + 4 + 7);
    const at::Tensor &g_mean = grads[0], &g_query = grads[1];
    if (!g_mean.defined() && !g_query.defined()) return out;
    const bool create_graph = at::GradMode::is_enabled();
    at::Tensor g_theta, g_lr;
    {
      at::NoGradGuard no_grad;
      const int64_t T = sx.size(0);
      // [1] when only the mean has a gradient: the op spreads one value over every task
      at::Tensor gq = g_mean.defined() ? scaled(g_mean.detach(), 1.0 / static_cast<double>(T)) : at::Tensor();
      if (g_query.defined()) gq = gq.defined() ? g_query.detach().add(gq) : g_query.detach();
      std::tie(g_theta, g_lr) = bwd_op().call(gq.to(theta.scalar_type()).contiguous(), theta, lr, sx, saved[3],
                                              saved[4], saved[5], saved[6], dims, cfg[0], cfg[1], lr_per_param,
                                              cfg[3] != 0);
    }
    variable_list pieces = g_theta.split_with_sizes(numels);
    int64_t at_shape = 0;
    for (size_t i = 0; i < n_params; ++i) {
      std::vector<int64_t> shape(shapes.begin() + at_shape, shapes.begin() + at_shape + ranks[i]);
      at_shape += ranks[i];
      pieces[i] = pieces[i].view(shape);
    }
    if (lr_per_param) pieces.push_back(g_lr);
    if (create_graph) {
      // the views above share g_theta's storage; NoSecondOrder copies them apart
      pieces = NoSecondOrder::apply(saved[7], at::TensorList(pieces));
    }
    for (size_t i = 0; i < n_params; ++i) out[1 + i] = pieces[i];
    if (lr_per_param) out[1 + n_params] = pieces[n_params];
    return out;
  }
};

std::vector<at::Tensor> fused_inner_loop_autograd(const at::Tensor& theta, at::TensorList params,
                                                  const at::Tensor& lr, const at::Tensor& sx, const at::Tensor& sy,
                                                  const at::Tensor& qx, const at::Tensor& qy, at::IntArrayRef dims,
                                                  int64_t steps, int64_t loss_kind, bool lr_per_param,
                                                  bool first_order, bool need_fast) {
  TORCH_CHECK(!params.empty(), "params must list the tensors theta's storage backs, got none");
  int64_t total = 0;
  bool needs_grad = lr_per_param && lr.requires_grad();
  for (const at::Tensor& p : params) {
    TORCH_CHECK(p.scalar_type() == theta.scalar_type() && p.device() == theta.device(),
                "params must share theta's dtype and device");
    total += p.numel();
    needs_grad = needs_grad || p.requires_grad();
  }
  TORCH_CHECK(total == theta.numel(), "params must hold theta's ", theta.numel(), " elements (the tensors theta's "
              "storage backs), got ", total);
  needs_grad = needs_grad && at::GradMode::is_enabled();
  // CPU tensors whose task slices are contiguous go in as they are (e.g. support / query slices of one tensor)
  auto tasks = [](const at::Tensor& x) { return x.is_cuda() || !task_slices_contiguous(x) ? x.contiguous() : x; };
  return FusedInnerLoopFn::apply(theta, params, lr, tasks(sx), tasks(sy), tasks(qx), tasks(qy), dims, steps,
                                 loss_kind, lr_per_param, first_order, needs_grad, need_fast);
}

}  // namespace
}  // namespace fused_inner_loop
}  // namespace metafast

TORCH_LIBRARY_FRAGMENT(metafast, m) {
  m.def(
      "fused_inner_loop_autograd(Tensor theta, Tensor[] params, Tensor lr, Tensor sx, Tensor sy, Tensor qx, "
      "Tensor qy, int[] dims, int steps, int loss_kind, bool lr_per_param, bool first_order, bool need_fast=True) "
      "-> Tensor[]");
}

TORCH_LIBRARY_IMPL(metafast, CompositeImplicitAutograd, m) {
  m.impl("fused_inner_loop_autograd", &metafast::fused_inner_loop::fused_inner_loop_autograd);
}
