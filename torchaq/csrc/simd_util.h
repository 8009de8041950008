// Horizontal helpers shared by the AVX2 and AVX-512 files (SSE4.1 / AVX2 instructions only).
// Anonymous namespace: see scan_kernels.h.
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace torchaq {
namespace cpu {
namespace {

// max over the 32 uint16 sums of a block (16 even + 16 odd classes), as a float key.
inline float max_u16(__m256i even, __m256i odd) {
  const __m256i m = _mm256_max_epu16(even, odd);
  const __m128i m8 = _mm_max_epu16(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
  // phminposuw finds the minimum of 8 words: the max is the complement of the complement's min
  const __m128i mn = _mm_minpos_epu16(_mm_xor_si128(m8, _mm_set1_epi32(-1)));
  return float(0xFFFF - (uint32_t(_mm_cvtsi128_si32(mn)) & 0xFFFF));
}

// A block's 32 uint16 sums (16 even classes, then 16 odd), kept between the passes of the top-k.
inline void store_sums(uint16_t* dst, __m256i even, __m256i odd) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), even);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16), odd);
}
inline void load_sums(const uint16_t* src, __m256i* even, __m256i* odd) {
  *even = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  *odd = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 16));
}

}  // namespace
}  // namespace cpu
}  // namespace torchaq
