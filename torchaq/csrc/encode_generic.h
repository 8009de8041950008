// The row kernel of the PQ encoders, included by encode_scalar.cpp and encode_avx2.cpp (one copy
// per instruction set, in an anonymous namespace; see encode_kernels.h).
//
// Per row x (float32, -ffp-contract=off everywhere, so every ISA rounds identically):
//   dots[m, j]  = <x_m, C_m[j]>                          (sum over t = 0..dsub-1 in order)
//   L2 code     c_m = first argmin_j  |C_m[j]|^2 / 2 - dots[m, j]
// and, with eta (Guo et al. 2020, section 4.2; ScaNN's noise-shaped coordinate descent):
//   e[m, j]     = (|x_m|^2 - 2 dots[m, j]) + |C_m[j]|^2
//   coef        = (eta - 1) / |x|^2   (0 for a zero row)
//   per round:  |r|^2 = sum_m e[m, c_m], <r, x> = |x|^2 - sum_m dots[m, c_m], then for m = 0..M-1
//     loss_j = ((|r|^2 - e[m, c]) + e[m, j]) + (coef * b_j) * b_j,  b_j = (<r, x> + dots[m, c]) - dots[m, j]
//     move to the first argmin j if loss_j < loss_c, updating |r|^2 and <r, x>;
//   stop after a round that moves nothing or after max_rounds rounds.
// This is torchaq.encode.anisotropic_encode_reference, row by row; codes can differ from it only
// where two candidates' losses are within float rounding (sums are accumulated in another order).
#pragma once
#include <cstdint>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "encode_kernels.h"

namespace torchaq {
namespace cpu {
namespace {

// dots[m * K + j] = <x_m, C_m[j]> for all m, j; xsq_sub[m] = |x_m|^2.
template <int64_t KC>
inline void row_dots(const EncodeProblem& p, const float* __restrict x, float* __restrict dots,
                     float* __restrict xsq_sub) {
  const int64_t K = KC > 0 ? KC : p.K, dsub = p.dsub;
  for (int64_t m = 0; m < p.M; ++m) {
    float* __restrict dm = dots + m * K;
    const float* __restrict cm = p.cbt + m * dsub * K;
    const float* __restrict xm = x + m * dsub;
    for (int64_t j = 0; j < K; ++j) dm[j] = 0.f;
    float s = 0.f;
    for (int64_t t = 0; t < dsub; ++t) {
      const float xv = xm[t];
      const float* __restrict ct = cm + t * K;
      for (int64_t j = 0; j < K; ++j) dm[j] = dm[j] + xv * ct[j];
      s = s + xv * xv;
    }
    xsq_sub[m] = s;
  }
}

#if defined(__AVX2__)
// K = 16 with AVX2: vector minimum, then the first lane equal to it (the same index as below).
inline int64_t first_argmin16(const float* __restrict v) {
  const __m256 a = _mm256_loadu_ps(v), b = _mm256_loadu_ps(v + 8);
  __m128 m4 = _mm_min_ps(_mm256_castps256_ps128(_mm256_min_ps(a, b)), _mm256_extractf128_ps(_mm256_min_ps(a, b), 1));
  m4 = _mm_min_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_min_ss(m4, _mm_shuffle_ps(m4, m4, 1));
  const __m256 bm = _mm256_broadcastss_ps(m4);
  const unsigned mask = unsigned(_mm256_movemask_ps(_mm256_cmp_ps(a, bm, _CMP_EQ_OQ))) |
                        (unsigned(_mm256_movemask_ps(_mm256_cmp_ps(b, bm, _CMP_EQ_OQ))) << 8);
  return __builtin_ctz(mask);
}
#endif

// First index of the smallest of v[0..K) (no NaN: the inputs are finite): the minimum by a
// branch-free reduction, then the first position that holds it.
inline int64_t first_argmin(const float* __restrict v, int64_t K) {
#if defined(__AVX2__)
  if (K == 16) return first_argmin16(v);
#endif
  float bv = v[0];
  for (int64_t j = 1; j < K; ++j) bv = v[j] < bv ? v[j] : bv;
  int64_t best = 0;
  while (v[best] != bv) ++best;
  return best;
}

template <int64_t KC>
inline void encode_rows_k(const EncodeProblem& p, int64_t r0, int64_t r1, float* scratch) {
  const int64_t M = p.M, K = KC > 0 ? KC : p.K, D = p.M * p.dsub;
  float* __restrict dots = scratch;
  float* __restrict dist = dots + M * K;
  float* __restrict xsq_sub = dist + M * K;
  float* __restrict tmp = xsq_sub + M;
  for (int64_t r = r0; r < r1; ++r) {
    const float* x = p.x + r * D;
    int64_t* __restrict codes = p.codes + r * M;
    row_dots<KC>(p, x, dots, xsq_sub);
    for (int64_t m = 0; m < M; ++m) {
      const float* __restrict hm = p.half_sq + m * K;
      const float* __restrict dm = dots + m * K;
      for (int64_t j = 0; j < K; ++j) tmp[j] = hm[j] - dm[j];
      codes[m] = first_argmin(tmp, K);
    }
    if (p.eta == nullptr || p.max_rounds <= 0) continue;
    float x_sq = 0.f;
    for (int64_t t = 0; t < D; ++t) x_sq = x_sq + x[t] * x[t];
    const float coef = x_sq > 0.f ? (p.eta[r] - 1.f) / x_sq : 0.f;
    for (int64_t m = 0; m < M; ++m) {
      const float* __restrict cs = p.code_sq + m * K;
      const float* __restrict dm = dots + m * K;
      float* __restrict em = dist + m * K;
      const float xs = xsq_sub[m];
      for (int64_t j = 0; j < K; ++j) em[j] = (xs - 2.f * dm[j]) + cs[j];
    }
    for (int64_t round = 0; round < p.max_rounds; ++round) {
      float r_sq = 0.f, dot_sum = 0.f;
      for (int64_t m = 0; m < M; ++m) {
        r_sq = r_sq + dist[m * K + codes[m]];
        dot_sum = dot_sum + dots[m * K + codes[m]];
      }
      float r_dot_x = x_sq - dot_sum;
      bool moved = false;
      for (int64_t m = 0; m < M; ++m) {
        const float* __restrict em = dist + m * K;
        const float* __restrict dm = dots + m * K;
        const int64_t c = codes[m];
        const float d_cur = em[c], p_cur = dm[c];
        const float a = r_sq - d_cur, b = r_dot_x + p_cur;
        for (int64_t j = 0; j < K; ++j) {
          const float bj = b - dm[j];
          tmp[j] = (a + em[j]) + (coef * bj) * bj;
        }
        const int64_t best = first_argmin(tmp, K);
        if (tmp[best] < tmp[c]) {
          r_sq = r_sq + (em[best] - d_cur);
          r_dot_x = r_dot_x + (p_cur - dm[best]);
          codes[m] = best;
          moved = true;
        }
      }
      if (!moved) break;
    }
  }
}

// Compile-time K for the two code widths (the K loops become whole SIMD vectors).
inline void encode_rows_impl(const EncodeProblem& p, int64_t r0, int64_t r1, float* scratch) {
  if (p.K == 16) encode_rows_k<16>(p, r0, r1, scratch);
  else if (p.K == 256) encode_rows_k<256>(p, r0, r1, scratch);
  else encode_rows_k<0>(p, r0, r1, scratch);
}

}  // namespace
}  // namespace cpu
}  // namespace torchaq
