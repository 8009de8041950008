// The 4-bit scans' LUT quantization (lut_topk, lut_score_quantized): one uint8 table per query.
// The scheme and its error bound are described at the top of scan.cpp and in lut_quantize.h.
#include "lut_quantize.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace torchaq {
namespace cpu {
namespace {

// min and max of the 16 entries of one LUT row (entries are finite: checked by the caller).
inline void row_range(const float* l, float* lo, float* hi) {
#if defined(__SSE2__)
  __m128 mn = _mm_loadu_ps(l), mx = mn;
  for (int j = 4; j < 16; j += 4) {
    const __m128 x = _mm_loadu_ps(l + j);
    mn = _mm_min_ps(mn, x);
    mx = _mm_max_ps(mx, x);
  }
  mn = _mm_min_ps(mn, _mm_movehl_ps(mn, mn));
  mn = _mm_min_ss(mn, _mm_shuffle_ps(mn, mn, 1));
  mx = _mm_max_ps(mx, _mm_movehl_ps(mx, mx));
  mx = _mm_max_ss(mx, _mm_shuffle_ps(mx, mx, 1));
  *lo = _mm_cvtss_f32(mn);
  *hi = _mm_cvtss_f32(mx);
#else
  *lo = *std::min_element(l, l + 16);
  *hi = *std::max_element(l, l + 16);
#endif
}

// q[j] = uint8(min(255, (l[j] - mn) * sf + 0.5)) for the 16 entries of one row (the values are
// >= 0.5, so truncation rounds to nearest; the saturating packs do the min).
inline void quantize_row(const float* l, float mn, float sf, uint8_t* q) {
#if defined(__SSE2__)
  const __m128 vmn = _mm_set1_ps(mn), vsf = _mm_set1_ps(sf), half = _mm_set1_ps(0.5f);
  __m128i w[4];
  for (int j = 0; j < 4; ++j)
    w[j] = _mm_cvttps_epi32(_mm_add_ps(_mm_mul_ps(_mm_sub_ps(_mm_loadu_ps(l + 4 * j), vmn), vsf), half));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q),
                   _mm_packus_epi16(_mm_packs_epi32(w[0], w[1]), _mm_packs_epi32(w[2], w[3])));
#else
  for (int j = 0; j < 16; ++j) q[j] = uint8_t(std::min(255.f, (l[j] - mn) * sf + 0.5f));
#endif
}

// Fewest uint8 steps the median subspace's trimmed range may span before a query falls back to the
// exact float scan (benchmarks/outliers.py prints how often it triggers on real tables).
constexpr double kMinMedianLevels = 4.0;

// 4th largest minus 4th smallest of the 16 entries of one LUT row.
inline double trimmed_range(const float* l) {
  float t[16];
  std::memcpy(t, l, sizeof(t));
  std::nth_element(t, t + 3, t + 16);
  std::nth_element(t + 4, t + 12, t + 16);
  return double(t[12]) - double(t[3]);
}

}  // namespace

// Per-query uint8 LUT (B, 2P, 16) (rows >= M zero), 1 / scale and the sum of offsets, from
// finite entries (checked by the caller). coarse[b] = 1 when query b's median subspace range gets
// fewer than kMinMedianLevels steps (its table cannot be resolved with one scale).
void quantize_lut(const at::Tensor& lut, int64_t P, uint8_t* qlut, float* inv_scale, float* offset,
                  uint8_t* coarse) {
  const int64_t B = lut.size(0), M = lut.size(1);
  TORCH_CHECK_VALUE(M < 65535, "lut_topk: 4-bit codes support M < 65535 subspaces, got M = ", M);
  const float* L = lut.const_data_ptr<float>();
  // ~M * 16 entries per query: a few queries already pay for a thread
  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / (16 * M)), [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> mins;  // reused: no allocation per call
    thread_local std::vector<double> ranges;
    if (mins.size() < size_t(M)) mins.resize(size_t(M));
    if (ranges.size() < size_t(M)) ranges.resize(size_t(M));
    for (int64_t b = begin; b < end; ++b) {
      const float* l = L + b * M * 16;
      uint8_t* q = qlut + b * 2 * P * 16;
      std::memset(q + M * 16, 0, size_t((2 * P - M) * 16));
      double maxr = 0, sumr = 0, off = 0;
      for (int64_t m = 0; m < M; ++m) {
        float lo, hi;  // exact: both are entries of the row
        row_range(l + m * 16, &lo, &hi);
        const double r = double(hi) - double(lo);  // exact in double
        mins[size_t(m)] = lo;
        maxr = std::max(maxr, r);
        sumr += r;
        off += lo;
      }
      const double scale = maxr > 0 ? std::min(255.0 / maxr, double(65535 - M) / sumr) : 1.0;
      // the median trimmed range of an evenly spaced sample of at most ~16 subspaces (cheap next to
      // the scan at batch 1; a false alarm only costs speed: the fallback is exact)
      const int64_t stride = std::max<int64_t>(1, M / 16);
      int64_t ns = 0;
      for (int64_t m = 0; m < M; m += stride) ranges[size_t(ns++)] = trimmed_range(l + m * 16);
      std::nth_element(ranges.begin(), ranges.begin() + ns / 2, ranges.begin() + ns);
      coarse[b] = maxr > 0 && ranges[size_t(ns / 2)] * scale < kMinMedianLevels ? 1 : 0;
      if (scale < 1e37) {
        // float (vectorised): the rounding error of (l - min) * scale is ~1e-7 of a step, far
        // inside the half step of slack that the uint16 budget keeps per subspace
        const float sf = float(scale);
        for (int64_t m = 0; m < M; ++m) quantize_row(l + m * 16, mins[size_t(m)], sf, q + m * 16);
      } else {  // ranges below ~1e-35: the scale overflows float
        for (int64_t m = 0; m < M; ++m) {
          for (int j = 0; j < 16; ++j) {
            const double v = (double(l[m * 16 + j]) - double(mins[size_t(m)])) * scale + 0.5;  // round, v >= 0.5
            q[m * 16 + j] = uint8_t(std::min(255.0, v));
          }
        }
      }
      inv_scale[b] = float(1.0 / scale);
      offset[b] = float(off);
    }
  });
}

}  // namespace cpu
}  // namespace torchaq
