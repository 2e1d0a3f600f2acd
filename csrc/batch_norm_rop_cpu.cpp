// metafast::batch_norm_rforward_cxx / batch_norm_rbackward_cxx: batch norm's R-operators with batch
// statistics (the directional derivatives of its forward and of its backward that MAML's exact
// second-order reverse needs; formulas in metafast/ops/batch_norm_rop.py), CPU kernels.
//
// Every output element is a per-channel linear combination of the inputs' elements, whose
// coefficients need per-channel sums over (N, *spatial). One task per channel runs both passes over
// that channel's N * S elements while they are in cache, so each full-size tensor crosses memory once
// (the composite PyTorch form reads them 3-4 times: several native_batch_norm_backward calls and
// in-place updates). Sums accumulate in float64, as ATen's own CPU batch norm does.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "channel_maps.h"

namespace metafast {
namespace batch_norm_rop {
namespace {

using channel_maps::channel_vec;
using channel_maps::check_map;
using channel_maps::cpu_has_avx2_fma;
using channel_maps::given;
using channel_maps::grain;
using channel_maps::Shape;

// R(y) = w invstd (rx - mean(rx) - xhat mean(rx xhat)) + R(w) xhat + R(b), xhat = (x - mean) invstd;
// also returns sum(rx xhat) and sum(rx) (what rbackward needs of this pass).
template <typename T>
struct RfArgs {
  Shape sh;
  const T *x, *rx;
  T *ry, *s_rxx, *s_rx;
  const double *w, *mean, *invstd, *rw, *rb;
};

// kRx: rx is given (else R(y) comes from R(w), R(b) alone). One loop per pass; the variants are
// compile-time so that no map that is absent is read.
template <typename T, bool kRx>
inline void rforward_channels(const RfArgs<T>& A, int64_t c0, int64_t c1) {
  const int64_t N = A.sh.N, C = A.sh.C, S = A.sh.S;
  const double M = static_cast<double>(N * S);
  for (int64_t c = c0; c < c1; ++c) {
    const double mu = A.mean[c], s = A.invstd[c];
    double a_rx = 0, b_xc = 0, k = 0;  // R(y) = a_rx rx + b_xc (x - mean) + k
    if constexpr (kRx) {
      double srx = 0, srxc = 0;  // sum(rx), sum(rx (x - mean))
      for (int64_t n = 0; n < N; ++n) {
        const T *xp = A.x + (n * C + c) * S, *rp = A.rx + (n * C + c) * S;
#pragma omp simd reduction(+ : srx, srxc)
        for (int64_t i = 0; i < S; ++i) {
          const double r = rp[i];
          srx += r;
          srxc += r * (static_cast<double>(xp[i]) - mu);
        }
      }
      const double srxx = srxc * s;
      A.s_rxx[c] = static_cast<T>(srxx);
      A.s_rx[c] = static_cast<T>(srx);
      a_rx = A.w[c] * s;
      b_xc = -a_rx * srxx * s / M;
      k = -a_rx * srx / M;
    }
    if (A.rw != nullptr) {
      b_xc += A.rw[c] * s;
      k += A.rb[c];
    }
    // the elementwise pass in T, as PyTorch's own ops run it (float32: twice the SIMD width)
    const T ta = static_cast<T>(a_rx), tb = static_cast<T>(b_xc), tk = static_cast<T>(k), tmu = static_cast<T>(mu);
    for (int64_t n = 0; n < N; ++n) {
      const T* xp = A.x + (n * C + c) * S;
      const T* rp = kRx ? A.rx + (n * C + c) * S : nullptr;
      T* yp = A.ry + (n * C + c) * S;
#pragma omp simd
      for (int64_t i = 0; i < S; ++i) {
        T v = tb * (xp[i] - tmu) + tk;
        if constexpr (kRx) v += ta * rp[i];
        yp[i] = v;
      }
    }
  }
}

// The R-operator of native_batch_norm_backward at gy along (rx, R(w)), applied to rgy:
//   R(dx) = w s (rgy - mean(rgy) - xhat mean(rgy xhat)) + R(w s) (gy - m1 - xhat m2)
//           - w s (xhat sum(gy R(xhat)) / M + m2 R(xhat)),
//   R(dw) = sum(rgy xhat) + sum(gy R(xhat)),  R(db) = sum(rgy),
// with m1 = mean(gy), m2 = mean(gy xhat), R(xhat) = s (rx - mean(rx) - xhat mean(rx xhat)),
// R(s) = -s^2 mean(xhat rx), R(w s) = R(w) s + w R(s).
template <typename T>
struct RbArgs {
  Shape sh;
  const T *x, *gy, *rgy, *rx;
  T *rgx, *r_gw, *r_gb;
  const double *w, *mean, *invstd, *s_rxx, *s_rx, *rw;
};

// kGy: the terms in gy are needed (rx or R(w) given; else R(dx) is batch norm's backward of rgy);
// kRx: rx is given. One loop per pass; the variants are compile-time so that no absent map is read.
template <typename T, bool kGy, bool kRx>
inline void rbackward_channels(const RbArgs<T>& A, int64_t c0, int64_t c1) {
  static_assert(kGy || !kRx, "rx brings the gy terms");
  const int64_t N = A.sh.N, C = A.sh.C, S = A.sh.S;
  const double M = static_cast<double>(N * S);
  for (int64_t c = c0; c < c1; ++c) {
    const double mu = A.mean[c], s = A.invstd[c];
    double srg = 0, srgc = 0, sg = 0, sgc = 0, sgr = 0;  // sums of rgy, rgy xc, gy, gy xc, gy rx
    for (int64_t n = 0; n < N; ++n) {
      const int64_t o = (n * C + c) * S;
      const T *xp = A.x + o, *rgp = A.rgy + o, *gp = kGy ? A.gy + o : nullptr, *rp = kRx ? A.rx + o : nullptr;
#pragma omp simd reduction(+ : srg, srgc, sg, sgc, sgr)
      for (int64_t i = 0; i < S; ++i) {
        const double xc = static_cast<double>(xp[i]) - mu, r = rgp[i];
        srg += r;
        srgc += r * xc;
        if constexpr (kGy) {
          const double g = gp[i];
          sg += g;
          sgc += g * xc;
          if constexpr (kRx) sgr += g * static_cast<double>(rp[i]);
        }
      }
    }
    const double ws = A.w[c] * s;
    const double sum_rg_xhat = srgc * s;
    // R(dx) = ws rgy + a_g gy + a_rx rx + b_xhat xhat + k
    double a_g = 0, a_rx = 0, b_xhat = -ws * sum_rg_xhat / M, k = -ws * srg / M;
    double g_rxh = 0;  // sum(gy R(xhat))
    if constexpr (kGy) {
      const double gw = sgc * s, m1 = sg / M, m2 = gw / M;
      double r_ws = A.rw != nullptr ? A.rw[c] * s : 0.0;
      double c_xhat = 0, cst = 0;
      if constexpr (kRx) {
        const double a = A.s_rxx[c] / M, mr = A.s_rx[c] / M;
        r_ws -= A.w[c] * s * s * a;
        g_rxh = s * (sgr - a * gw - mr * sg);
        a_rx = -ws * m2 * s;
        c_xhat += ws * m2 * s * a;
        cst += ws * m2 * s * mr;
      }
      c_xhat += -r_ws * m2 - ws * g_rxh / M;
      cst += -r_ws * m1;
      a_g = r_ws;
      b_xhat += c_xhat;
      k += cst;
    }
    A.r_gw[c] = static_cast<T>(sum_rg_xhat + g_rxh);
    A.r_gb[c] = static_cast<T>(srg);
    if (A.rgx == nullptr) continue;
    // the elementwise pass in T, as PyTorch's own ops run it (float32: twice the SIMD width)
    const T t_rg = static_cast<T>(ws), t_g = static_cast<T>(a_g), t_rx = static_cast<T>(a_rx),
            t_xc = static_cast<T>(b_xhat * s), tk = static_cast<T>(k), tmu = static_cast<T>(mu);
    for (int64_t n = 0; n < N; ++n) {
      const int64_t o = (n * C + c) * S;
      const T *xp = A.x + o, *rgp = A.rgy + o, *gp = kGy ? A.gy + o : nullptr, *rp = kRx ? A.rx + o : nullptr;
      T* op = A.rgx + o;
#pragma omp simd
      for (int64_t i = 0; i < S; ++i) {
        T v = t_rg * rgp[i] + t_xc * (xp[i] - tmu) + tk;
        if constexpr (kGy) v += t_g * gp[i];
        if constexpr (kRx) v += t_rx * rp[i];
        op[i] = v;
      }
    }
  }
}

// AVX2/FMA copies of the loops above (channel_maps.h)
template <typename T, bool kRx>
__attribute__((target("avx2,fma"), flatten)) void rforward_channels_avx2(const RfArgs<T>& A, int64_t c0, int64_t c1) {
  rforward_channels<T, kRx>(A, c0, c1);
}

template <typename T, bool kGy, bool kRx>
__attribute__((target("avx2,fma"), flatten)) void rbackward_channels_avx2(const RbArgs<T>& A, int64_t c0,
                                                                           int64_t c1) {
  rbackward_channels<T, kGy, kRx>(A, c0, c1);
}

template <typename T, bool kRx>
void rforward_kernel(const RfArgs<T>& A) {
  const bool avx2 = cpu_has_avx2_fma();
  at::parallel_for(0, A.sh.C, grain(A.sh), [&](int64_t c0, int64_t c1) {
    avx2 ? rforward_channels_avx2<T, kRx>(A, c0, c1) : rforward_channels<T, kRx>(A, c0, c1);
  });
}

template <typename T, bool kGy, bool kRx>
void rbackward_kernel(const RbArgs<T>& A) {
  const bool avx2 = cpu_has_avx2_fma();
  at::parallel_for(0, A.sh.C, grain(A.sh), [&](int64_t c0, int64_t c1) {
    avx2 ? rbackward_channels_avx2<T, kGy, kRx>(A, c0, c1) : rbackward_channels<T, kGy, kRx>(A, c0, c1);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_rforward_cxx(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& invstd,
    const c10::optional<at::Tensor>& rx, const c10::optional<at::Tensor>& rw, const c10::optional<at::Tensor>& rb) {
  const Shape sh = check_map(x, "x", nullptr);
  if (given(rx)) check_map(*rx, "rx", &x);
  TORCH_CHECK(given(rx) || given(rw), "batch_norm_rforward: rx or rw must be given (R(y) is zero otherwise)");
  TORCH_CHECK(given(rw) == given(rb), "rw and rb must be given together");
  const auto w = channel_vec(weight, "weight", sh.C, 1.0), mu = channel_vec(mean, "mean", sh.C, 0.0),
             s = channel_vec(invstd, "invstd", sh.C, 0.0), rwv = channel_vec(rw, "rw", sh.C, 0.0),
             rbv = channel_vec(rb, "rb", sh.C, 0.0);
  at::Tensor ry = at::empty_like(x);
  at::Tensor s_rxx = at::empty({given(rx) ? sh.C : 0}, x.options());
  at::Tensor s_rx = at::empty({given(rx) ? sh.C : 0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_rforward_cxx", [&] {
    const RfArgs<scalar_t> args{sh, x.data_ptr<scalar_t>(), given(rx) ? rx->data_ptr<scalar_t>() : nullptr,
                                ry.data_ptr<scalar_t>(), given(rx) ? s_rxx.data_ptr<scalar_t>() : nullptr,
                                given(rx) ? s_rx.data_ptr<scalar_t>() : nullptr, w.data(), mu.data(), s.data(),
                                given(rw) ? rwv.data() : nullptr, given(rw) ? rbv.data() : nullptr};
    given(rx) ? rforward_kernel<scalar_t, true>(args) : rforward_kernel<scalar_t, false>(args);
  });
  return {ry, s_rxx, s_rx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_rbackward_cxx(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& gy, const at::Tensor& rgy, const c10::optional<at::Tensor>& rx,
    const c10::optional<at::Tensor>& sum_rx_xhat, const c10::optional<at::Tensor>& sum_rx,
    const c10::optional<at::Tensor>& rw, bool need_gx) {
  const Shape sh = check_map(x, "x", nullptr);
  check_map(gy, "gy", &x);
  check_map(rgy, "rgy", &x);
  if (given(rx)) {
    check_map(*rx, "rx", &x);
    TORCH_CHECK(given(sum_rx_xhat) && given(sum_rx), "sum_rx_xhat and sum_rx (from batch_norm_rforward) must be "
                "given with rx");
  }
  const auto w = channel_vec(weight, "weight", sh.C, 1.0), mu = channel_vec(mean, "mean", sh.C, 0.0),
             s = channel_vec(invstd, "invstd", sh.C, 0.0), srxx = channel_vec(sum_rx_xhat, "sum_rx_xhat", sh.C, 0.0),
             srx = channel_vec(sum_rx, "sum_rx", sh.C, 0.0), rwv = channel_vec(rw, "rw", sh.C, 0.0);
  at::Tensor rgx = need_gx ? at::empty_like(x) : at::Tensor();
  at::Tensor r_gw = at::empty({sh.C}, x.options()), r_gb = at::empty({sh.C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_rbackward_cxx", [&] {
    const RbArgs<scalar_t> args{sh, x.data_ptr<scalar_t>(), gy.data_ptr<scalar_t>(), rgy.data_ptr<scalar_t>(),
                                given(rx) ? rx->data_ptr<scalar_t>() : nullptr,
                                need_gx ? rgx.data_ptr<scalar_t>() : nullptr, r_gw.data_ptr<scalar_t>(),
                                r_gb.data_ptr<scalar_t>(), w.data(), mu.data(), s.data(), srxx.data(), srx.data(),
                                given(rw) ? rwv.data() : nullptr};
    if (given(rx))
      rbackward_kernel<scalar_t, true, true>(args);
    else if (given(rw))
      rbackward_kernel<scalar_t, true, false>(args);
    else  // R(dx) is batch norm's backward of rgy
      rbackward_kernel<scalar_t, false, false>(args);
  });
  return {rgx, r_gw, r_gb};
}

}  // namespace
}  // namespace batch_norm_rop
}  // namespace metafast

TORCH_LIBRARY_FRAGMENT(metafast, m) {
  // (R(y), sum(rx xhat) [C], sum(rx) [C]); the sums are empty without rx.
  m.def(
      "batch_norm_rforward_cxx(Tensor x, Tensor? weight, Tensor mean, Tensor invstd, Tensor? rx, Tensor? rw, "
      "Tensor? rb) -> (Tensor, Tensor, Tensor)");
  // (R(dx) or undefined when not need_gx, R(dw) [C], R(db) [C]).
  m.def(
      "batch_norm_rbackward_cxx(Tensor x, Tensor? weight, Tensor mean, Tensor invstd, Tensor gy, Tensor rgy, "
      "Tensor? rx, Tensor? sum_rx_xhat, Tensor? sum_rx, Tensor? rw, bool need_gx) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(metafast, CPU, m) {
  m.impl("batch_norm_rforward_cxx", &metafast::batch_norm_rop::batch_norm_rforward_cxx);
  m.impl("batch_norm_rbackward_cxx", &metafast::batch_norm_rop::batch_norm_rbackward_cxx);
}
