// metafast::to_nchw_cxx: a channels_last float32 map [N, C, H, W] copied to contiguous NCHW, CPU.
//
// Per sample this is the transpose of an [H*W, C] matrix. PyTorch's copy runs it as one strided
// loop whose every read of an output row lands on a different page once C is large (Conv4's grouped
// maps: C = 32 tasks x 64 = 2048, rows 8 KB apart), ~3.6 GB/s here. This kernel moves 16 x 8 tiles
// (two 8 x 8 AVX2 register transposes), so each tile reads 16 short row pieces and writes 8 whole
// 64-byte lines. Scalar edges; a scalar copy of the same tiling without AVX2.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>

namespace metafast {
namespace to_nchw {
namespace {

constexpr int64_t kRows = 16;  // spatial positions per tile: one 64-byte output line per channel
constexpr int64_t kCols = 8;   // channels per tile

// src: rows x C (row stride C), dst: C x HW (row stride HW); one tile of rows [r0, r1) x [c0, c1).
inline void tile_scalar(const float* src, float* dst, int64_t C, int64_t HW, int64_t r0, int64_t r1, int64_t c0,
                        int64_t c1) {
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t r = r0; r < r1; ++r) dst[c * HW + r] = src[r * C + c];
}

__attribute__((target("avx2"))) inline void transpose8(const float* src, int64_t sstride, float* dst,
                                                      int64_t dstride) {
  __m256 r0 = _mm256_loadu_ps(src + 0 * sstride), r1 = _mm256_loadu_ps(src + 1 * sstride);
  __m256 r2 = _mm256_loadu_ps(src + 2 * sstride), r3 = _mm256_loadu_ps(src + 3 * sstride);
  __m256 r4 = _mm256_loadu_ps(src + 4 * sstride), r5 = _mm256_loadu_ps(src + 5 * sstride);
  __m256 r6 = _mm256_loadu_ps(src + 6 * sstride), r7 = _mm256_loadu_ps(src + 7 * sstride);
  __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst + 0 * dstride, _mm256_permute2f128_ps(s0, s4, 0x20));
  _mm256_storeu_ps(dst + 1 * dstride, _mm256_permute2f128_ps(s1, s5, 0x20));
  _mm256_storeu_ps(dst + 2 * dstride, _mm256_permute2f128_ps(s2, s6, 0x20));
  _mm256_storeu_ps(dst + 3 * dstride, _mm256_permute2f128_ps(s3, s7, 0x20));
  _mm256_storeu_ps(dst + 4 * dstride, _mm256_permute2f128_ps(s0, s4, 0x31));
  _mm256_storeu_ps(dst + 5 * dstride, _mm256_permute2f128_ps(s1, s5, 0x31));
  _mm256_storeu_ps(dst + 6 * dstride, _mm256_permute2f128_ps(s2, s6, 0x31));
  _mm256_storeu_ps(dst + 7 * dstride, _mm256_permute2f128_ps(s3, s7, 0x31));
}

// Rows [r0, r1) of one sample, every channel.
template <bool kAvx2>
void row_block(const float* src, float* dst, int64_t C, int64_t HW, int64_t r0, int64_t r1) {
  const int64_t c_full = kAvx2 ? C / kCols * kCols : 0;
  for (int64_t c0 = 0; c0 < c_full; c0 += kCols) {
    int64_t r = r0;
    if constexpr (kAvx2) {
      for (; r + 8 <= r1; r += 8) transpose8(src + r * C + c0, C, dst + c0 * HW + r, HW);
    }
    tile_scalar(src, dst, C, HW, r, r1, c0, c0 + kCols);
  }
  for (int64_t c0 = c_full; c0 < C; c0 += kCols) tile_scalar(src, dst, C, HW, r0, r1, c0, std::min(C, c0 + kCols));
}

__attribute__((target("avx2"), flatten)) void row_block_avx2(const float* src, float* dst, int64_t C, int64_t HW,
                                                            int64_t r0, int64_t r1) {
  row_block<true>(src, dst, C, HW, r0, r1);
}

bool cpu_has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}

at::Tensor to_nchw_cxx(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor, got one on ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 4, "x must be [N, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "x must be channels_last, got strides ",
              x.strides());
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return out;
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t blocks = (HW + kRows - 1) / kRows;
  const bool avx2 = cpu_has_avx2();
  // one work item: kRows spatial rows of one sample, all channels (~kRows * C * 8 bytes moved)
  at::parallel_for(0, N * blocks, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, kRows * C)),
                   [&](int64_t b0, int64_t b1) {
                     for (int64_t b = b0; b < b1; ++b) {
                       const int64_t n = b / blocks, r0 = (b % blocks) * kRows, r1 = std::min(HW, r0 + kRows);
                       const float* s = src + n * HW * C;
                       float* d = dst + n * C * HW;
                       if (avx2)
                         row_block_avx2(s, d, C, HW, r0, r1);
                       else
                         row_block<false>(s, d, C, HW, r0, r1);
                     }
                   });
  return out;
}

}  // namespace
}  // namespace to_nchw
}  // namespace metafast

TORCH_LIBRARY_FRAGMENT(metafast, m) {
  m.def("to_nchw_cxx(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(metafast, CPU, m) {
  m.impl("to_nchw_cxx", &metafast::to_nchw::to_nchw_cxx);
}
