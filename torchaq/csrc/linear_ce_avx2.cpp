// AVX2 + FMA element-wise tile kernels of the fused linear cross-entropy (contract:
// linear_ce_kernels.h). Compiled with the AVX2 flags of setup.py; called only when the CPU reports them.
#include <immintrin.h>

#include <cmath>

#include "exp_avx2.h"
#include "linear_ce_kernels.h"

namespace torchaq {
namespace cpu {
namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

}  // namespace

void lce_stats_avx2(const float* tile, int64_t n, int64_t w, float* mx, float* se, float* ls) {
  const int64_t wv = w - w % 8;
  for (int64_t i = 0; i < n; ++i) {
    const float* row = tile + i * w;
    __m256 m = _mm256_set1_ps(-INFINITY);
    for (int64_t j = 0; j < wv; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(row + j));
    float rmax = hmax(m);
    for (int64_t j = wv; j < w; ++j) rmax = std::fmax(rmax, row[j]);
    const __m256 vm = _mm256_set1_ps(rmax);
    __m256 s = _mm256_setzero_ps(), t = _mm256_setzero_ps();
    for (int64_t j = 0; j < wv; j += 8) {
      const __m256 v = _mm256_loadu_ps(row + j);
      s = _mm256_add_ps(s, exp8(_mm256_sub_ps(v, vm)));
      t = _mm256_add_ps(t, v);
    }
    float rs = hsum(s), rt = hsum(t);
    for (int64_t j = wv; j < w; ++j) {
      rs += std::exp(row[j] - rmax);
      rt += row[j];
    }
    mx[i] = rmax;
    se[i] = rs;
    if (ls != nullptr) ls[i] = rt;
  }
}

void lce_grad_avx2(float* tile, int64_t n, int64_t w, const float* lse, const float* a, const float* s, float cap) {
  const int64_t wv = w - w % 8;
  const float inv_s = cap > 0 ? 1.0f / cap : 0.0f;
  const __m256 inv = _mm256_set1_ps(inv_s), one = _mm256_set1_ps(1.0f);
  for (int64_t i = 0; i < n; ++i) {
    float* row = tile + i * w;
    const float si = s ? s[i] : 0.0f;
    const __m256 vl = _mm256_set1_ps(lse[i]), va = _mm256_set1_ps(a[i]), vs = _mm256_set1_ps(si);
    for (int64_t j = 0; j < wv; j += 8) {
      const __m256 v = _mm256_loadu_ps(row + j);
      __m256 g = _mm256_sub_ps(_mm256_mul_ps(va, exp8(_mm256_sub_ps(v, vl))), vs);
      if (cap > 0) {
        const __m256 q = _mm256_mul_ps(v, inv);
        g = _mm256_mul_ps(g, _mm256_fnmadd_ps(q, q, one));
      }
      _mm256_storeu_ps(row + j, g);
    }
    for (int64_t j = wv; j < w; ++j) {
      float g = a[i] * std::exp(row[j] - lse[i]) - si;
      if (cap > 0) g *= 1.0f - (row[j] * inv_s) * (row[j] * inv_s);
      row[j] = g;
    }
  }
}

}  // namespace cpu
}  // namespace torchaq
