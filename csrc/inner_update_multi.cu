// Multi-tensor inner update (apex style): every parameter of a module in one launch.
//
//   out[i] = params[i] - lr_i * scale * grads[i]
//   lr_i   = lrs[i] (shaped like params[i], or 0-d) or a host scalar;  scale = min(1, c),
//   c      = max_norm / (n + 1e-6),  n = ||concat_i grads[i]||_2  (one global norm: one task)
//
// Backward for the gradients g_out[i] of sum_i sum(g_out[i] * out[i]):
//   d_grads[i] = -scale * lr_i * g_out[i] + kk * grads[i]
//   kk         = s * max_norm / ((n + 1e-6)^2 n)  when c <= 1 and n > 0, else 0
//   s          = sum_i sum(g_out[i] * lr_i * grads[i])
//   d_lrs[i]   = -scale * g_out[i] * grads[i]      (summed for a 0-d lr_i)
//   (d_params[i] = g_out[i] needs no kernel.)
//
// The tensors are cut into chunks of kChunk elements. A table of up to kMaxEntries tensors
// (pointers, sizes, first chunk) travels as a kernel argument; each block finds its tensor by binary
// search over the first chunks. More tensors than kMaxEntries take one launch per kMaxEntries.
// With clipping, a partial-sum launch and a one-block finalisation come first.
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
#include <type_traits>
#include <vector>

#include "checks.h"
#include "inner_update.h"
#include "inner_update_common.cuh"

namespace metafast {
namespace inner_update {
namespace {

constexpr int64_t kChunk = 4096;   // elements per block-chunk (a multiple of every pack size)
constexpr int kMaxEntries = 60;    // keeps the table argument under the 4 KiB kernel-parameter limit

struct Entry {
  const void* a;        // forward: param    backward: grad_out
  const void* b;        // grad
  const void* lr;       // lr tensor (flags' lr mode), or null
  void* out;            // forward: out      backward: d_grad (or null)
  void* out2;           // backward: d_lr (per-element lr), or null
  int64_t numel;
  int64_t first_chunk;  // global index of this tensor's first chunk
  int32_t lr_mode;      // LrMode
  int32_t vec;          // 1: all pointers 16-byte aligned and numel a multiple of the pack size
};

struct Table {
  Entry e[kMaxEntries];
  int32_t n;             // entries used
  int64_t chunk_begin;   // global index of the first chunk of this launch (block 0)
  int64_t chunk_end;     // one past the last
};

__device__ __forceinline__ int find_entry(const Table& tab, int64_t chunk) {
  int lo = 0, hi = tab.n - 1;  // last entry whose first_chunk <= chunk
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (tab.e[mid].first_chunk <= chunk) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Calls f(j, width) for the element offsets j of this thread within the chunk [begin, begin+len),
// width = the pack size when the entry is vectorisable, else 1.
template <int V, typename F>
__device__ __forceinline__ void for_chunk(bool vec, int64_t len, F&& f) {
  if (vec) {
    for (int64_t j = static_cast<int64_t>(threadIdx.x) * V; j < len; j += static_cast<int64_t>(blockDim.x) * V)
      f(j, std::integral_constant<int, V>());
  } else {
    for (int64_t j = threadIdx.x; j < len; j += blockDim.x) f(j, std::integral_constant<int, 1>());
  }
}

// sumsq_part[c] = sum over chunk c of grad^2;  dot_part[c] = sum over chunk c of grad_out * lr * grad.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) multi_partials_kernel(
    const Table tab,
    acc_type<scalar_t>* __restrict__ sumsq_part,  // [n_chunks] out
    acc_type<scalar_t>* __restrict__ dot_part,    // [n_chunks] out, or null: no dot
    acc_type<scalar_t> lr_value                   // the lr when kLrValue
) {
  using acc_t = acc_type<scalar_t>;
  constexpr int V = pack_size<scalar_t>();
  __shared__ acc_t smem[33];
  for (int64_t c = tab.chunk_begin + blockIdx.x; c < tab.chunk_end; c += gridDim.x) {
    const Entry& e = tab.e[find_entry(tab, c)];
    const int64_t begin = (c - e.first_chunk) * kChunk;
    const int64_t len = e.numel - begin < kChunk ? e.numel - begin : kChunk;
    const auto* g = static_cast<const scalar_t*>(e.b) + begin;
    const auto* go = static_cast<const scalar_t*>(e.a) + begin;
    const auto* lr = static_cast<const scalar_t*>(e.lr);
    const bool per_elem = e.lr_mode == kLrPerElem;
    const acc_t lr_s = e.lr_mode == kLrScalarPtr ? static_cast<acc_t>(*lr) : lr_value;
    acc_t ss = 0, dd = 0;
    for_chunk<V>(e.vec != 0, len, [&](int64_t j, auto width) {
      constexpr int W = decltype(width)::value;
      const auto gv = load_pack<W>(g + j);
#pragma unroll
      for (int k = 0; k < W; ++k) ss += static_cast<acc_t>(gv.v[k]) * static_cast<acc_t>(gv.v[k]);
      if (dot_part != nullptr) {
        const auto gov = load_pack<W>(go + j);
        if (per_elem) {
          const auto lv = load_pack<W>(lr + begin + j);
#pragma unroll
          for (int k = 0; k < W; ++k)
            dd += static_cast<acc_t>(gov.v[k]) * static_cast<acc_t>(lv.v[k]) * static_cast<acc_t>(gv.v[k]);
        } else {
#pragma unroll
          for (int k = 0; k < W; ++k) dd += lr_s * static_cast<acc_t>(gov.v[k]) * static_cast<acc_t>(gv.v[k]);
        }
      }
    });
    ss = block_sum(ss, smem);
    if (dot_part != nullptr) dd = block_sum(dd, smem);
    if (threadIdx.x == 0) {
      sumsq_part[c] = ss;
      if (dot_part != nullptr) dot_part[c] = dd;
    }
  }
}

// One block: coef[0] = scale, coef[1] = kk (0 without a dot) from all the chunks' partial sums.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) multi_clip_coeffs_kernel(
    const acc_t* __restrict__ sumsq_part,  // [n_chunks]
    const acc_t* __restrict__ dot_part,    // [n_chunks], or null
    acc_t* __restrict__ coef,              // [2] out
    int64_t n_chunks, acc_t max_norm) {
  __shared__ acc_t smem[33];
  acc_t ss = 0, s = 0;
  for (int64_t c = threadIdx.x; c < n_chunks; c += blockDim.x) {
    ss += sumsq_part[c];
    if (dot_part != nullptr) s += dot_part[c];
  }
  ss = block_sum(ss, smem);
  s = block_sum(s, smem);
  if (threadIdx.x == 0) {
    const acc_t n = sqrt(ss);
    const acc_t c = clip_coef(n, max_norm);
    const bool clipped = c <= acc_t(1);  // the gradient of clamp(c, max=1) passes at c == 1
    const acc_t ne = n + acc_t(1e-6);
    coef[0] = clipped ? c : acc_t(1);
    coef[1] = (clipped && n > acc_t(0)) ? s * max_norm / (ne * ne * n) : acc_t(0);
  }
}

// out[i] = params[i] - lr_i * scale * grads[i]
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) multi_fwd_kernel(
    const Table tab,
    const acc_type<scalar_t>* __restrict__ coef,  // [2] from multi_clip_coeffs_kernel, or null: scale 1
    acc_type<scalar_t> lr_value                   // the lr when kLrValue
) {
  using acc_t = acc_type<scalar_t>;
  constexpr int V = pack_size<scalar_t>();
  const acc_t scale = coef != nullptr ? coef[0] : acc_t(1);
  for (int64_t c = tab.chunk_begin + blockIdx.x; c < tab.chunk_end; c += gridDim.x) {
    const Entry& e = tab.e[find_entry(tab, c)];
    const int64_t begin = (c - e.first_chunk) * kChunk;
    const int64_t len = e.numel - begin < kChunk ? e.numel - begin : kChunk;
    const auto* p = static_cast<const scalar_t*>(e.a) + begin;
    const auto* g = static_cast<const scalar_t*>(e.b) + begin;
    const auto* lr = static_cast<const scalar_t*>(e.lr);
    auto* out = static_cast<scalar_t*>(e.out) + begin;
    const bool per_elem = e.lr_mode == kLrPerElem;
    const acc_t lr_s = e.lr_mode == kLrScalarPtr ? static_cast<acc_t>(*lr) : lr_value;
    for_chunk<V>(e.vec != 0, len, [&](int64_t j, auto width) {
      constexpr int W = decltype(width)::value;
      const auto pv = load_pack<W>(p + j);
      const auto gv = load_pack<W>(g + j);
      Pack<scalar_t, W> lv;
      if (per_elem) lv = load_pack<W>(lr + begin + j);
      Pack<scalar_t, W> o;
#pragma unroll
      for (int k = 0; k < W; ++k) {
        const acc_t l = per_elem ? static_cast<acc_t>(lv.v[k]) : lr_s;
        o.v[k] = static_cast<scalar_t>(static_cast<acc_t>(pv.v[k]) - l * (scale * static_cast<acc_t>(gv.v[k])));
      }
      store_pack<W>(out + j, o);
    });
  }
}

// d_grad = -scale * lr * g_out + kk * grad;  d_lr = -scale * g_out * grad (per element), or its
// chunk sums into dlr_part for a 0-d lr.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) multi_bwd_kernel(
    const Table tab,
    const acc_type<scalar_t>* __restrict__ coef,  // [2] (scale, kk), or null: (1, 0)
    acc_type<scalar_t>* __restrict__ dlr_part,    // [n_chunks] out (0-d lr entries with out2), or null
    acc_type<scalar_t> lr_value                   // the lr when kLrValue
) {
  using acc_t = acc_type<scalar_t>;
  constexpr int V = pack_size<scalar_t>();
  __shared__ acc_t smem[33];
  const acc_t scale = coef != nullptr ? coef[0] : acc_t(1);
  const acc_t kk = coef != nullptr ? coef[1] : acc_t(0);
  for (int64_t c = tab.chunk_begin + blockIdx.x; c < tab.chunk_end; c += gridDim.x) {
    const Entry& e = tab.e[find_entry(tab, c)];
    const int64_t begin = (c - e.first_chunk) * kChunk;
    const int64_t len = e.numel - begin < kChunk ? e.numel - begin : kChunk;
    const auto* go = static_cast<const scalar_t*>(e.a) + begin;
    const auto* g = static_cast<const scalar_t*>(e.b) + begin;
    const auto* lr = static_cast<const scalar_t*>(e.lr);
    auto* d_grad = e.out != nullptr ? static_cast<scalar_t*>(e.out) + begin : nullptr;
    const bool per_elem = e.lr_mode == kLrPerElem;
    // A d_lr output means this entry's lr needs its gradient: per element into out2, else summed.
    const bool need_lr = e.out2 != nullptr;
    auto* d_lr = need_lr && per_elem ? static_cast<scalar_t*>(e.out2) + begin : nullptr;
    const acc_t lr_s = e.lr_mode == kLrScalarPtr ? static_cast<acc_t>(*lr) : lr_value;
    acc_t dl_sum = 0;
    for_chunk<V>(e.vec != 0, len, [&](int64_t j, auto width) {
      constexpr int W = decltype(width)::value;
      const auto gov = load_pack<W>(go + j);
      const auto gv = load_pack<W>(g + j);
      Pack<scalar_t, W> lv;
      if (per_elem) lv = load_pack<W>(lr + begin + j);
      Pack<scalar_t, W> dg, dl;
#pragma unroll
      for (int k = 0; k < W; ++k) {
        const acc_t l = per_elem ? static_cast<acc_t>(lv.v[k]) : lr_s;
        const acc_t x = static_cast<acc_t>(gov.v[k]);
        const acc_t y = static_cast<acc_t>(gv.v[k]);
        dg.v[k] = static_cast<scalar_t>(-scale * l * x + kk * y);
        const acc_t v = -scale * x * y;
        dl.v[k] = static_cast<scalar_t>(v);
        dl_sum += v;
      }
      if (d_grad != nullptr) store_pack<W>(d_grad + j, dg);
      if (d_lr != nullptr) store_pack<W>(d_lr + j, dl);
    });
    if (need_lr && !per_elem) {  // uniform over the block: one entry per chunk
      dl_sum = block_sum(dl_sum, smem);
      if (threadIdx.x == 0) dlr_part[c] = dl_sum;
    }
  }
}

// d_lr of each 0-d lr entry = the sum of its chunks' dlr_part.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) multi_dlr_sum_kernel(const Table tab,
                                                                 const acc_type<scalar_t>* __restrict__ dlr_part) {
  using acc_t = acc_type<scalar_t>;
  for (int i = threadIdx.x; i < tab.n; i += blockDim.x) {
    const Entry& e = tab.e[i];
    if (e.out2 == nullptr || e.lr_mode == kLrPerElem) continue;
    const int64_t n_chunks = (e.numel + kChunk - 1) / kChunk;
    acc_t s = 0;
    for (int64_t c = 0; c < n_chunks; ++c) s += dlr_part[e.first_chunk + c];
    *static_cast<scalar_t*>(e.out2) = static_cast<scalar_t>(s);
  }
}

// ------------------------------------------------------------------------------------- launchers

// Validates the lists: one device, one floating dtype, contiguous, matching shapes. `what` names the
// first list ("params" or "grad_outs").
void check_lists(at::TensorList firsts, const char* what, at::TensorList grads, at::TensorList lrs) {
  TORCH_CHECK(!firsts.empty(), what, " must not be empty");
  TORCH_CHECK(grads.size() == firsts.size(), "grads must have one tensor per ", what, " (", firsts.size(),
              "), got ", grads.size());
  TORCH_CHECK(lrs.empty() || lrs.size() == firsts.size(), "lrs must be empty or have one tensor per ", what, " (",
              firsts.size(), "), got ", lrs.size());
  const at::Tensor& ref = firsts[0];
  TORCH_CHECK(ref.is_cuda(), what, "[0] must be a CUDA tensor, got a tensor on ", ref.device());
  TORCH_CHECK(ref.scalar_type() == at::kHalf || ref.scalar_type() == at::kBFloat16 ||
                  ref.scalar_type() == at::kFloat || ref.scalar_type() == at::kDouble,
              what, "[0] must be float16, bfloat16, float32 or float64, got ", ref.scalar_type());
  for (size_t i = 0; i < firsts.size(); ++i) {
    const at::Tensor* ts[3] = {&firsts[i], &grads[i], lrs.empty() ? nullptr : &lrs[i]};
    const char* names[3] = {what, "grads", "lrs"};
    for (int k = 0; k < 3; ++k) {
      if (ts[k] == nullptr) continue;
      const at::Tensor& x = *ts[k];
      TORCH_CHECK(x.device() == ref.device(), names[k], "[", i, "] must be on ", ref.device(), ", got ", x.device());
      TORCH_CHECK(x.scalar_type() == ref.scalar_type(), names[k], "[", i, "] must have dtype ", ref.scalar_type(),
                  ", got ", x.scalar_type());
      TORCH_CHECK(x.is_contiguous(), names[k], "[", i, "] must be contiguous");
    }
    TORCH_CHECK(grads[i].sizes() == firsts[i].sizes(), "grads[", i, "] must have the shape of ", what, "[", i,
                "] ", firsts[i].sizes(), ", got ", grads[i].sizes());
    if (!lrs.empty())
      TORCH_CHECK(lrs[i].dim() == 0 || lrs[i].sizes() == firsts[i].sizes(), "lrs[", i, "] must be 0-d or of shape ",
                  firsts[i].sizes(), ", got ", lrs[i].sizes());
  }
}

// Splits the entries into launch tables of at most kMaxEntries; chunk indices are global.
std::vector<Table> make_tables(const std::vector<Entry>& entries) {
  std::vector<Table> tables;
  for (size_t i = 0; i < entries.size(); i += kMaxEntries) {
    Table tab{};
    tab.n = static_cast<int32_t>(std::min<size_t>(kMaxEntries, entries.size() - i));
    for (int k = 0; k < tab.n; ++k) tab.e[k] = entries[i + k];
    const Entry& last = tab.e[tab.n - 1];
    tab.chunk_begin = tab.e[0].first_chunk;
    tab.chunk_end = last.first_chunk + ceil_div(last.numel, kChunk);
    tables.push_back(tab);
  }
  return tables;
}

// Fills first_chunk and vec; returns the total number of chunks.
template <typename scalar_t>
int64_t finish_entries(std::vector<Entry>& entries) {
  constexpr int V = pack_size<scalar_t>();
  int64_t chunks = 0;
  for (Entry& e : entries) {
    e.first_chunk = chunks;
    chunks += ceil_div(e.numel, kChunk);
    bool vec = e.numel % V == 0 && aligned16(e.a) && aligned16(e.b);
    vec = vec && (e.out == nullptr || aligned16(e.out));
    // lr and d_lr are read/written per element only for a per-element lr.
    vec = vec && (e.lr_mode != kLrPerElem || (aligned16(e.lr) && (e.out2 == nullptr || aligned16(e.out2))));
    e.vec = vec ? 1 : 0;
  }
  return chunks;
}

unsigned grid_for(const Table& tab) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(tab.chunk_end - tab.chunk_begin, 1 << 30)));
}

// Partial sums over all tables, then the one-block finalisation into coef = [scale, kk].
template <typename scalar_t>
at::Tensor clip_coeffs(const std::vector<Table>& tables, int64_t n_chunks, bool with_dot, double lr_value,
                       double max_norm, const at::TensorOptions& acc_opts, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  at::Tensor sumsq = at::empty({n_chunks}, acc_opts);
  at::Tensor dot = with_dot ? at::empty({n_chunks}, acc_opts) : at::Tensor();
  for (const Table& tab : tables) {
    multi_partials_kernel<scalar_t><<<grid_for(tab), kThreads, 0, stream>>>(
        tab, sumsq.mutable_data_ptr<acc_t>(), with_dot ? dot.mutable_data_ptr<acc_t>() : nullptr,
        static_cast<acc_t>(lr_value));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor coef = at::empty({2}, acc_opts);
  multi_clip_coeffs_kernel<acc_t><<<1, kThreads, 0, stream>>>(
      sumsq.const_data_ptr<acc_t>(), with_dot ? dot.const_data_ptr<acc_t>() : nullptr,
      coef.mutable_data_ptr<acc_t>(), n_chunks, static_cast<acc_t>(max_norm));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return coef;
}

int lr_mode_of(at::TensorList lrs, size_t i) {
  if (lrs.empty()) return kLrValue;
  return lrs[i].dim() == 0 ? kLrScalarPtr : kLrPerElem;
}

}  // namespace

std::vector<at::Tensor> inner_update_multi_cuda(at::TensorList params, at::TensorList grads, at::TensorList lrs,
                                                double lr_scalar, std::optional<double> max_norm) {
  check_lists(params, "params", grads, lrs);
  TORCH_CHECK(!max_norm.has_value() || *max_norm > 0, "max_norm must be None or > 0, got ", max_norm.value_or(0));
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto stream = current_stream();
  std::vector<at::Tensor> outs;
  std::vector<Entry> entries;
  for (size_t i = 0; i < params.size(); ++i) {
    outs.push_back(at::empty_like(params[i], at::MemoryFormat::Contiguous));
    if (params[i].numel() == 0) continue;
    Entry e{};
    e.a = params[i].data_ptr();
    e.b = grads[i].data_ptr();
    e.lr = lrs.empty() ? nullptr : lrs[i].data_ptr();
    e.out = outs.back().data_ptr();
    e.numel = params[i].numel();
    e.lr_mode = lr_mode_of(lrs, i);
    entries.push_back(e);
  }
  if (entries.empty()) return outs;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "inner_update_multi_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const int64_t n_chunks = finish_entries<scalar_t>(entries);
    const auto tables = make_tables(entries);
    at::Tensor coef;
    if (max_norm.has_value()) {
      coef = clip_coeffs<scalar_t>(tables, n_chunks, /*with_dot=*/false, lr_scalar, *max_norm,
                                   params[0].options().dtype(c10::CppTypeToScalarType<acc_t>::value), stream);
    }
    for (const Table& tab : tables) {
      multi_fwd_kernel<scalar_t><<<grid_for(tab), kThreads, 0, stream>>>(
          tab, coef.defined() ? coef.const_data_ptr<acc_t>() : nullptr, static_cast<acc_t>(lr_scalar));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return outs;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> inner_update_multi_backward_cuda(
    at::TensorList grad_outs, at::TensorList grads, at::TensorList lrs, double lr_scalar,
    std::optional<double> max_norm, bool need_grad, bool need_lr) {
  check_lists(grad_outs, "grad_outs", grads, lrs);
  TORCH_CHECK(!max_norm.has_value() || *max_norm > 0, "max_norm must be None or > 0, got ", max_norm.value_or(0));
  TORCH_CHECK(!need_lr || !lrs.empty(), "need_lr is set but lrs is empty");
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const auto stream = current_stream();
  std::vector<at::Tensor> d_grads, d_lrs;
  std::vector<Entry> entries;
  for (size_t i = 0; i < grads.size(); ++i) {
    if (need_grad) d_grads.push_back(at::empty_like(grads[i], at::MemoryFormat::Contiguous));
    if (need_lr) {
      // A 0-d lr of an empty tensor gets gradient 0 (no chunk writes it).
      d_lrs.push_back(grads[i].numel() == 0 ? at::zeros_like(lrs[i]) : at::empty_like(lrs[i]));
    }
    if (grads[i].numel() == 0) continue;
    Entry e{};
    e.a = grad_outs[i].data_ptr();
    e.b = grads[i].data_ptr();
    e.lr = lrs.empty() ? nullptr : lrs[i].data_ptr();
    e.out = need_grad ? d_grads.back().data_ptr() : nullptr;
    e.out2 = need_lr ? d_lrs.back().data_ptr() : nullptr;
    e.numel = grads[i].numel();
    e.lr_mode = lr_mode_of(lrs, i);
    entries.push_back(e);
  }
  if (entries.empty() || !(need_grad || need_lr)) return {d_grads, d_lrs};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(),
                                  "inner_update_multi_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto acc_opts = grads[0].options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const int64_t n_chunks = finish_entries<scalar_t>(entries);
    const auto tables = make_tables(entries);
    at::Tensor coef;
    if (max_norm.has_value()) {
      coef = clip_coeffs<scalar_t>(tables, n_chunks, /*with_dot=*/need_grad, lr_scalar, *max_norm, acc_opts, stream);
    }
    at::Tensor dlr_part = need_lr ? at::empty({n_chunks}, acc_opts) : at::Tensor();
    for (const Table& tab : tables) {
      multi_bwd_kernel<scalar_t><<<grid_for(tab), kThreads, 0, stream>>>(
          tab, coef.defined() ? coef.const_data_ptr<acc_t>() : nullptr,
          need_lr ? dlr_part.mutable_data_ptr<acc_t>() : nullptr, static_cast<acc_t>(lr_scalar));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (need_lr) {
        multi_dlr_sum_kernel<scalar_t><<<1, kThreads, 0, stream>>>(tab, dlr_part.const_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  });
  return {d_grads, d_lrs};
}

}  // namespace inner_update
}  // namespace metafast
