// AVX-512 dot products of the exact re-score (rescore.cpp); summation order of rescore_kernels.h.
// Compiled with the AVX-512 flags of setup.py; called only when the CPU reports them.
#include <immintrin.h>

#include "rescore_kernels.h"

namespace torchaq {
namespace cpu {
namespace {

// Rows are read at random (one per candidate): ask for the row `ahead` candidates on while the
// current one is summed, so its cache lines arrive in the shadow of this row's arithmetic.
constexpr int64_t kAhead = 2;

inline void prefetch_row(const float* r, int64_t d) {
  for (int64_t j = 0; j < d; j += 16) _mm_prefetch(reinterpret_cast<const char*>(r + j), _MM_HINT_T0);
}

inline float dot(const float* h, const float* w, int64_t d) {
  __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t i = 0;
  for (; i + 64 <= d; i += 64)
    for (int j = 0; j < 4; ++j)
      a[j] = _mm512_add_ps(a[j], _mm512_mul_ps(_mm512_loadu_ps(h + i + 16 * j), _mm512_loadu_ps(w + i + 16 * j)));
  if (i < d) {  // tail: missing elements load as zeros and add +0
    for (int j = 0; j < 4; ++j) {
      const int64_t left = d - i - 16 * j;
      const __mmask16 m = left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
      a[j] = _mm512_add_ps(a[j], _mm512_mul_ps(_mm512_maskz_loadu_ps(m, h + i + 16 * j),
                                               _mm512_maskz_loadu_ps(m, w + i + 16 * j)));
    }
  }
  const __m512 s = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
  __m256 t = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
  __m128 u = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
  u = _mm_add_ps(u, _mm_movehl_ps(u, u));
  u = _mm_add_ss(u, _mm_shuffle_ps(u, u, 1));
  return _mm_cvtss_f32(u);
}

}  // namespace

void dots_avx512(const float* h, const float* rows, int64_t ld, int64_t d, const int32_t* ids, int64_t n,
                 float* out) {
  for (int64_t i = 0; i < n && i < kAhead; ++i) prefetch_row(rows + int64_t(ids[i]) * ld, d);
  for (int64_t i = 0; i < n; ++i) {
    if (i + kAhead < n) prefetch_row(rows + int64_t(ids[i + kAhead]) * ld, d);
    out[i] = dot(h, rows + int64_t(ids[i]) * ld, d);
  }
}

}  // namespace cpu
}  // namespace torchaq
