// The row kernel of the PQ encoders, included by encode_scalar.cpp and encode_avx2.cpp (one copy
// per instruction set, in an anonymous namespace; see encode_kernels.h).
//
// Per row x (float32, -ffp-contract=off everywhere, so every ISA rounds identically):
//   dots[m, j]  = <x_m, C_m[j]>                          (sum over t = 0..dsub-1 in order)
//   L2 code     c_m = first argmin_j  |C_m[j]|^2 / 2 - dots[m, j]
// and, with eta (Guo et al. 2020, section 4.2; ScaNN's noise-shaped coordinate descent):
//   e[m, j]     = (|x_m|^2 - 2 dots[m, j]) + |C_m[j]|^2
//   coef        = (eta - 1) / |x|^2   (0 for a zero row; |x|^2 summed as in row_sq)
//   per round:  |r|^2 = sum_m e[m, c_m], <r, x> = |x|^2 - sum_m dots[m, c_m], then for m = 0..M-1
//     loss_j = ((|r|^2 - e[m, c]) + e[m, j]) + (coef * b_j) * b_j,  b_j = (<r, x> + dots[m, c]) - dots[m, j]
//     move to the first argmin j if loss_j < loss_c, updating |r|^2 and <r, x>;
//   stop after a round that moves nothing or after max_rounds rounds.
// This is torchaq.ops.encode.anisotropic_encode_reference, row by row; codes can differ from it only
// where two candidates' losses are within float rounding (sums are accumulated in another order).
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>
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

// |x|^2 in eight interleaved partial sums (element t goes to sum t % 8), added in a fixed tree:
// not one serial chain of D additions, and the same value whether or not the compiler vectorises.
inline float row_sq(const float* __restrict x, int64_t D) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t t = 0;
  for (; t + 8 <= D; t += 8)
    for (int u = 0; u < 8; ++u) acc[u] = acc[u] + x[t + u] * x[t + u];
  for (; t < D; ++t) acc[t & 7] = acc[t & 7] + x[t] * x[t];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

#if defined(__AVX2__)
// K = 16 with AVX2: vector minimum, then the first lane equal to it (the same index as below).
inline int64_t first_argmin16_regs(const __m256 a, const __m256 b) {
  __m128 m4 = _mm_min_ps(_mm256_castps256_ps128(_mm256_min_ps(a, b)), _mm256_extractf128_ps(_mm256_min_ps(a, b), 1));
  m4 = _mm_min_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_min_ss(m4, _mm_shuffle_ps(m4, m4, 1));
  const __m256 bm = _mm256_broadcastss_ps(m4);
  const unsigned mask = unsigned(_mm256_movemask_ps(_mm256_cmp_ps(a, bm, _CMP_EQ_OQ))) |
                        (unsigned(_mm256_movemask_ps(_mm256_cmp_ps(b, bm, _CMP_EQ_OQ))) << 8);
  return __builtin_ctz(mask);
}

inline int64_t first_argmin16(const float* __restrict v) {
  return first_argmin16_regs(_mm256_loadu_ps(v), _mm256_loadu_ps(v + 8));
}

// The L2 code of one subspace, first argmin_j of hm[j] - dm[j], in registers: the same values
// as the scalar loop through tmp, without a 16-float store read back as two vectors (which
// defeats store-to-load forwarding and stalls).
inline int64_t l2_code16(const float* __restrict hm, const float* __restrict dm) {
  return first_argmin16_regs(_mm256_sub_ps(_mm256_loadu_ps(hm), _mm256_loadu_ps(dm)),
                             _mm256_sub_ps(_mm256_loadu_ps(hm + 8), _mm256_loadu_ps(dm + 8)));
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

#if defined(__AVX2__)
// K = 16 descent with AVX2, eight rows at once, one per lane (descend_rows8_k16 below).
inline void descend_rows8_k16(const EncodeProblem& p, int64_t r0, int64_t r1, float* scratch);
#endif

template <int64_t KC>
inline void encode_rows_k(const EncodeProblem& p, int64_t r0, int64_t r1, float* scratch) {
#if defined(__AVX2__)
  if (KC == 16 && p.eta != nullptr && p.max_rounds > 0) {
    descend_rows8_k16(p, r0, r1, scratch);
    return;
  }
#endif
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
#if defined(__AVX2__)
      if (KC == 16) {
        codes[m] = l2_code16(hm, dm);
        continue;
      }
#endif
      for (int64_t j = 0; j < K; ++j) tmp[j] = hm[j] - dm[j];
      codes[m] = first_argmin(tmp, K);
    }
    if (p.eta == nullptr || p.max_rounds <= 0) continue;
    const float x_sq = row_sq(x, D);
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

#if defined(__AVX2__)
// The same descent as encode_rows_k for K = 16, on eight rows at once: lane l of every vector is
// row r + l. One row's descent is a serial chain over the M subspaces (each step reads the |r|^2
// and <r, x> the previous one left), so one row at a time waits on latency; eight independent
// chains fill the vector instead. Per lane every float operation is the scalar kernel's, in the
// same order (candidates j = 0..15 scanned with a strict <, which keeps the first argmin; |r|^2 and
// <r, x> summed over m in order), so the codes are bit-identical to the per-row kernel. A lane
// whose row has converged keeps running rounds with the others: a round that moves nothing leaves
// the state as it was, so the next one moves nothing either. Short blocks repeat their last row.
// Scratch (encode_scratch_floats): the block's dots as (M, 16, 8), its |x_m|^2 and the current
// code's e and dot as (M, 8), after the space encode_rows_k uses; the block's rows transposed
// (D, 8). e is recomputed in every round from the dots (the same three operations as in the
// prologue, so the same value): half the memory a round streams.
inline void descend_rows8_k16(const EncodeProblem& p, int64_t r0, int64_t r1, float* scratch) {
  constexpr int64_t K = 16, L = 8;
  const int64_t M = p.M, dsub = p.dsub, D = p.M * p.dsub;
  float* __restrict bd = scratch + 2 * M * K + M + 2 * K;  // (M, K, L) dots of the block
  float* __restrict xs8 = bd + M * K * L;  // (M, L) |x_m|^2 of the block's rows
  float* __restrict cur_e = xs8 + M * L;     // (M, L) e of the current code
  float* __restrict cur_d = cur_e + M * L;   // (M, L) dot of the current code
  std::vector<int32_t> code8(M * L);
  std::vector<float> xt_buf(D * L);
  float* __restrict xt = xt_buf.data();  // (D, L): the block's rows, transposed
  alignas(32) float x_sq8[L], coef8[L];
  for (int64_t b0 = r0; b0 < r1; b0 += L) {
    const int64_t nb = std::min<int64_t>(L, r1 - b0);
    for (int64_t l = 0; l < L; ++l) {
      const int64_t r = b0 + std::min<int64_t>(l, nb - 1);
      const float* x = p.x + r * D;
      for (int64_t t = 0; t < D; ++t) xt[t * L + l] = x[t];
      const float x_sq = row_sq(x, D);
      x_sq8[l] = x_sq;
      coef8[l] = x_sq > 0.f ? (p.eta[r] - 1.f) / x_sq : 0.f;
    }
    // row_dots, the L2 code and e of encode_rows_k, lane-wise (the same operations in the same
    // order per lane; the strict < over j = 0..15 keeps the first argmin like first_argmin16)
    for (int64_t m = 0; m < M; ++m) {
      const float* __restrict hm = p.half_sq + m * K;
      const float* __restrict cs = p.code_sq + m * K;
      const float* __restrict cm = p.cbt + m * dsub * K;
      __m256 d[K];
      for (int64_t j = 0; j < K; ++j) d[j] = _mm256_setzero_ps();
      __m256 xs = _mm256_setzero_ps();
      for (int64_t t = 0; t < dsub; ++t) {
        const __m256 xv = _mm256_loadu_ps(xt + (m * dsub + t) * L);
        const float* __restrict ct = cm + t * K;
        for (int64_t j = 0; j < K; ++j) d[j] = _mm256_add_ps(d[j], _mm256_mul_ps(xv, _mm256_set1_ps(ct[j])));
        xs = _mm256_add_ps(xs, _mm256_mul_ps(xv, xv));
      }
      _mm256_storeu_ps(xs8 + m * L, xs);
      __m256 best_h = _mm256_set1_ps(__builtin_inff()), best_e = _mm256_setzero_ps(), best_d = best_e;
      __m256i best_j = _mm256_setzero_si256();
      const __m256 two = _mm256_set1_ps(2.f);
      for (int64_t j = 0; j < K; ++j) {
        const __m256 e = _mm256_add_ps(_mm256_sub_ps(xs, _mm256_mul_ps(two, d[j])), _mm256_set1_ps(cs[j]));
        const __m256 h = _mm256_sub_ps(_mm256_set1_ps(hm[j]), d[j]);
        _mm256_storeu_ps(bd + (m * K + j) * L, d[j]);
        // j = 0 always takes (h < inf, or h is inf and then index 0 is the scalar answer too)
        const __m256 lt = j == 0 ? _mm256_castsi256_ps(_mm256_set1_epi32(-1)) : _mm256_cmp_ps(h, best_h, _CMP_LT_OQ);
        best_h = _mm256_blendv_ps(best_h, h, lt);
        best_e = _mm256_blendv_ps(best_e, e, lt);
        best_d = _mm256_blendv_ps(best_d, d[j], lt);
        best_j = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(best_j),
                                                      _mm256_castsi256_ps(_mm256_set1_epi32(int32_t(j))), lt));
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(code8.data() + m * L), best_j);
      _mm256_storeu_ps(cur_e + m * L, best_e);
      _mm256_storeu_ps(cur_d + m * L, best_d);
    }
    const __m256 coef = _mm256_load_ps(coef8), x_sq = _mm256_load_ps(x_sq8);
    const __m256 inf = _mm256_set1_ps(__builtin_inff()), two = _mm256_set1_ps(2.f);
    for (int64_t round = 0; round < p.max_rounds; ++round) {
      __m256 r_sq = _mm256_setzero_ps(), dot_sum = _mm256_setzero_ps();
      for (int64_t m = 0; m < M; ++m) {
        r_sq = _mm256_add_ps(r_sq, _mm256_loadu_ps(cur_e + m * L));
        dot_sum = _mm256_add_ps(dot_sum, _mm256_loadu_ps(cur_d + m * L));
      }
      __m256 r_dot_x = _mm256_sub_ps(x_sq, dot_sum);
      __m256 moved_any = _mm256_setzero_ps();
      for (int64_t m = 0; m < M; ++m) {
        const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(code8.data() + m * L));
        const __m256 d_cur = _mm256_loadu_ps(cur_e + m * L), p_cur = _mm256_loadu_ps(cur_d + m * L);
        const __m256 a = _mm256_sub_ps(r_sq, d_cur), b = _mm256_add_ps(r_dot_x, p_cur);
        const float* __restrict dm = bd + m * K * L;
        const float* __restrict cs = p.code_sq + m * K;
        const __m256 xs = _mm256_loadu_ps(xs8 + m * L);
        // the current code's candidate loss, as the scan computes it at j = c (e[c] = d_cur and
        // dots[c] = p_cur exactly)
        const __m256 bc = _mm256_sub_ps(b, p_cur);
        const __m256 cur_l = _mm256_add_ps(_mm256_add_ps(a, d_cur), _mm256_mul_ps(_mm256_mul_ps(coef, bc), bc));
        // two running minima, j = 0..7 and j = 8..15 (half the dependency chain); the upper one
        // wins only if strictly smaller, so the first argmin is kept
        __m256 best_l[2] = {inf, inf}, best_e[2] = {d_cur, d_cur}, best_d[2] = {p_cur, p_cur};
        __m256i best_j[2] = {_mm256_setzero_si256(), _mm256_set1_epi32(8)};
        for (int64_t j = 0; j < K / 2; ++j) {
          for (int h = 0; h < 2; ++h) {
            const int64_t jj = j + h * (K / 2);
            const __m256 d = _mm256_loadu_ps(dm + jj * L);
            // e exactly as the prologue computed it: (|x_m|^2 - 2 dots) + |C_m[j]|^2
            const __m256 e = _mm256_add_ps(_mm256_sub_ps(xs, _mm256_mul_ps(two, d)), _mm256_set1_ps(cs[jj]));
            const __m256 bj = _mm256_sub_ps(b, d);
            const __m256 loss = _mm256_add_ps(_mm256_add_ps(a, e), _mm256_mul_ps(_mm256_mul_ps(coef, bj), bj));
            const __m256 lt = _mm256_cmp_ps(loss, best_l[h], _CMP_LT_OQ);
            best_l[h] = _mm256_blendv_ps(best_l[h], loss, lt);
            best_e[h] = _mm256_blendv_ps(best_e[h], e, lt);
            best_d[h] = _mm256_blendv_ps(best_d[h], d, lt);
            best_j[h] = _mm256_castps_si256(_mm256_blendv_ps(
                _mm256_castsi256_ps(best_j[h]), _mm256_castsi256_ps(_mm256_set1_epi32(int32_t(jj))), lt));
          }
        }
        const __m256 hi = _mm256_cmp_ps(best_l[1], best_l[0], _CMP_LT_OQ);
        const __m256 best_lv = _mm256_blendv_ps(best_l[0], best_l[1], hi);
        const __m256 best_ev = _mm256_blendv_ps(best_e[0], best_e[1], hi);
        const __m256 best_dv = _mm256_blendv_ps(best_d[0], best_d[1], hi);
        const __m256i best_jv = _mm256_castps_si256(
            _mm256_blendv_ps(_mm256_castsi256_ps(best_j[0]), _mm256_castsi256_ps(best_j[1]), hi));
        const __m256 mv = _mm256_cmp_ps(best_lv, cur_l, _CMP_LT_OQ);
        if (_mm256_movemask_ps(mv) == 0) continue;
        moved_any = _mm256_or_ps(moved_any, mv);
        r_sq = _mm256_blendv_ps(r_sq, _mm256_add_ps(r_sq, _mm256_sub_ps(best_ev, d_cur)), mv);
        r_dot_x = _mm256_blendv_ps(r_dot_x, _mm256_add_ps(r_dot_x, _mm256_sub_ps(p_cur, best_dv)), mv);
        _mm256_storeu_ps(cur_e + m * L, _mm256_blendv_ps(d_cur, best_ev, mv));
        _mm256_storeu_ps(cur_d + m * L, _mm256_blendv_ps(p_cur, best_dv, mv));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(code8.data() + m * L),
                            _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(c), _mm256_castsi256_ps(best_jv), mv)));
      }
      if (_mm256_movemask_ps(moved_any) == 0) break;
    }
    for (int64_t l = 0; l < nb; ++l) {
      int64_t* __restrict codes = p.codes + (b0 + l) * M;
      for (int64_t m = 0; m < M; ++m) codes[m] = code8[m * L + l];
    }
  }
}
#endif

// Compile-time K for the two code widths (the K loops become whole SIMD vectors).
inline void encode_rows_impl(const EncodeProblem& p, int64_t r0, int64_t r1, float* scratch) {
  if (p.K == 16) encode_rows_k<16>(p, r0, r1, scratch);
  else if (p.K == 256) encode_rows_k<256>(p, r0, r1, scratch);
  else encode_rows_k<0>(p, r0, r1, scratch);
}

}  // namespace
}  // namespace cpu
}  // namespace torchaq
