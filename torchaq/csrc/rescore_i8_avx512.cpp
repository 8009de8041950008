// AVX-512 int8 shortlist dot products (rescore.cpp): exact integer sums, so equal to the portable
// kernel's (rescore_i8_kernels.h). vpmaddwd multiplies 32 int16 pairs and adds adjacent products
// into 16 int32 lanes. Compiled with the AVX-512 flags of setup.py; called only when the CPU
// reports them.
#include <immintrin.h>

#include "rescore_i8_kernels.h"

namespace torchaq {
namespace cpu {
namespace {

constexpr int64_t kAhead = 4;  // rows prefetched ahead (a row is d bytes: a few cache lines)

inline int32_t dot_i8(const int16_t* h16, const int8_t* w, int64_t d) {
  __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 64 <= d; i += 64) {
    const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i)));
    const __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i + 32)));
    a0 = _mm512_add_epi32(a0, _mm512_madd_epi16(_mm512_loadu_si512(h16 + i), w0));
    a1 = _mm512_add_epi32(a1, _mm512_madd_epi16(_mm512_loadu_si512(h16 + i + 32), w1));
  }
  for (; i < d; i += 32) {  // tail: missing elements load as zeros
    const int64_t left = d - i;
    const __mmask32 m = left >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << left) - 1);
    const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, w + i));
    a0 = _mm512_add_epi32(a0, _mm512_madd_epi16(_mm512_maskz_loadu_epi16(m, h16 + i), w0));
  }
  return _mm512_reduce_add_epi32(_mm512_add_epi32(a0, a1));
}

inline void prefetch_row(const int8_t* r, int64_t d) {
  for (int64_t j = 0; j < d; j += 64) _mm_prefetch(reinterpret_cast<const char*>(r + j), _MM_HINT_T0);
}

}  // namespace

void dots_i8_avx512(const int16_t* h16, float h_scale, const int8_t* rows8, const float* scale, int64_t d,
                    const int32_t* ids, int64_t n, float* out) {
  for (int64_t i = 0; i < n && i < kAhead; ++i) prefetch_row(rows8 + int64_t(ids[i]) * d, d);
  for (int64_t i = 0; i < n; ++i) {
    if (i + kAhead < n) prefetch_row(rows8 + int64_t(ids[i + kAhead]) * d, d);
    out[i] = float(dot_i8(h16, rows8 + int64_t(ids[i]) * d, d)) * (h_scale * scale[ids[i]]);
  }
}

}  // namespace cpu
}  // namespace torchaq
