// AVX2 dot products of the exact re-score (rescore.cpp); summation order of rescore_kernels.h.
// Compiled with the AVX2 flags of setup.py; called only when the CPU reports them.
#include <immintrin.h>

#include "rescore_kernels.h"

namespace torchaq {
namespace cpu {
namespace {

constexpr int64_t kAhead = 2;  // see rescore_avx512.cpp

inline void prefetch_row(const float* r, int64_t d) {
  for (int64_t j = 0; j < d; j += 16) _mm_prefetch(reinterpret_cast<const char*>(r + j), _MM_HINT_T0);
}

inline __m256i tail_mask(int64_t left) {  // lanes < left
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const int32_t l = int32_t(left < 0 ? 0 : left > 8 ? 8 : left);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(l), lane);
}

inline float dot(const float* h, const float* w, int64_t d) {
  __m256 a[8];
  for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();  // a[j]: partial sums 8 j .. 8 j + 7
  int64_t i = 0;
  for (; i + 64 <= d; i += 64)
    for (int j = 0; j < 8; ++j)
      a[j] = _mm256_add_ps(a[j], _mm256_mul_ps(_mm256_loadu_ps(h + i + 8 * j), _mm256_loadu_ps(w + i + 8 * j)));
  if (i < d) {
    for (int j = 0; j < 8; ++j) {
      const __m256i m = tail_mask(d - i - 8 * j);
      a[j] = _mm256_add_ps(a[j], _mm256_mul_ps(_mm256_maskload_ps(h + i + 8 * j, m), _mm256_maskload_ps(w + i + 8 * j, m)));
    }
  }
  // s[r] = (p[r] + p[r + 16]) + (p[r + 32] + p[r + 48]): lanes 0-7 from a0, a2, a4, a6, 8-15 from a1, a3, a5, a7
  const __m256 s0 = _mm256_add_ps(_mm256_add_ps(a[0], a[2]), _mm256_add_ps(a[4], a[6]));
  const __m256 s1 = _mm256_add_ps(_mm256_add_ps(a[1], a[3]), _mm256_add_ps(a[5], a[7]));
  const __m256 t = _mm256_add_ps(s0, s1);
  __m128 u = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
  u = _mm_add_ps(u, _mm_movehl_ps(u, u));
  u = _mm_add_ss(u, _mm_shuffle_ps(u, u, 1));
  return _mm_cvtss_f32(u);
}

}  // namespace

void dots_avx2(const float* h, const float* rows, int64_t ld, int64_t d, const int32_t* ids, int64_t n, float* out) {
  for (int64_t i = 0; i < n && i < kAhead; ++i) prefetch_row(rows + int64_t(ids[i]) * ld, d);
  for (int64_t i = 0; i < n; ++i) {
    if (i + kAhead < n) prefetch_row(rows + int64_t(ids[i + kAhead]) * ld, d);
    out[i] = dot(h, rows + int64_t(ids[i]) * ld, d);
  }
}

}  // namespace cpu
}  // namespace torchaq
