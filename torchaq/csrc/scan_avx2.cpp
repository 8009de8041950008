// AVX2 + FMA kernels. Compiled with -mavx2 -mfma only (see setup.py); called only when the CPU
// reports AVX2 and FMA (scan.cpp).
//
// 4-bit top-k: one 32-byte load is one packed row = subspaces (2p, 2p+1) of the 32 classes of a
// block; vpshufb looks up 32 uint8 entries per instruction from a 16-entry table broadcast to
// both 128-bit lanes (vbroadcasti128 straight from the (2P, 16) quantized LUT). uint16
// accumulation with the lo/hi trick, as in scan_avx512.cpp.
#include <immintrin.h>

#include "scan_generic.h"
#include "simd_util.h"

namespace torchaq {
namespace cpu {
namespace {

constexpr int kGroup = 4;  // queries sharing one code load

inline __m256i table(const uint8_t* T) {
  return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(T)));
}

// uint16 sums of the 32 classes of one block for Q queries (quantized tables T, tstride apart),
// as even classes (even[j]) and odd classes (odd[j]).
// Not inlined on purpose: inlined into the scan loops (whose two-pass bookkeeping keeps many values
// live), the compiler spilled the table pointers and the loop counter of this, the hottest loop, to
// the stack.
template <int Q>
__attribute__((noinline)) void block_sums(const uint8_t* codes, int64_t P, const uint8_t* T, int64_t tstride, __m256i* even,
                       __m256i* odd) {
  const __m256i m0f = _mm256_set1_epi8(0x0f);
  __m256i A[Q], B[Q];
  for (int j = 0; j < Q; ++j) A[j] = B[j] = _mm256_setzero_si256();
  for (int64_t p = 0; p < P; ++p) {
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + p * kBlock));
    const __m256i lo = _mm256_and_si256(c, m0f);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), m0f);
    for (int j = 0; j < Q; ++j) {
      const uint8_t* tp = T + j * tstride + (2 * p) * 16;
      const __m256i r0 = _mm256_shuffle_epi8(table(tp), lo);
      const __m256i r1 = _mm256_shuffle_epi8(table(tp + 16), hi);
      A[j] = _mm256_add_epi16(A[j], r0);
      A[j] = _mm256_add_epi16(A[j], r1);
      B[j] = _mm256_add_epi16(B[j], _mm256_srli_epi16(r0, 8));
      B[j] = _mm256_add_epi16(B[j], _mm256_srli_epi16(r1, 8));
    }
  }
  for (int j = 0; j < Q; ++j) {
    even[j] = _mm256_sub_epi16(A[j], _mm256_slli_epi16(B[j], 8));
    odd[j] = B[j];
  }
}

// Keys of one block as in scan_avx512.cpp, in four vectors: classes 0-14 even, 16-30 even,
// 1-15 odd, 17-31 odd.
template <bool kBias>
inline void block_keys(const Topk4Args& a, int64_t q, int64_t base, __m256i even, __m256i odd, __m256* k) {
  const __m256i src[2] = {even, odd};
  __m256 bv[4];
  if (kBias) {  // the bias in natural order, split into the same four groups of classes
    const float* b = base + kBlock <= a.num_classes ? a.bias + base : a.bias_tail;
    for (int h = 0; h < 2; ++h) {
      const __m256 x0 = _mm256_loadu_ps(b + 16 * h), x1 = _mm256_loadu_ps(b + 16 * h + 8);
      // per 128-bit lane (x0_0, x0_2, x1_0, x1_2 | x0_4, x0_6, x1_4, x1_6); then 64-bit pairs reordered
      const __m256 e = _mm256_shuffle_ps(x0, x1, _MM_SHUFFLE(2, 0, 2, 0));
      const __m256 o = _mm256_shuffle_ps(x0, x1, _MM_SHUFFLE(3, 1, 3, 1));
      bv[h] = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), _MM_SHUFFLE(3, 1, 2, 0)));
      bv[2 + h] = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), _MM_SHUFFLE(3, 1, 2, 0)));
    }
  }
  for (int v = 0; v < 4; ++v) {
    const __m128i half = (v & 1) ? _mm256_extracti128_si256(src[v >> 1], 1) : _mm256_castsi256_si128(src[v >> 1]);
    k[v] = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(half));
    if (kBias) {
      k[v] = _mm256_add_ps(_mm256_mul_ps(k[v], _mm256_set1_ps(a.inv_scale[q])),
                           _mm256_add_ps(_mm256_set1_ps(a.offset[q]), bv[v]));
    }
  }
}

inline float block_max(const __m256* k) {
  __m256 m = _mm256_max_ps(_mm256_max_ps(k[0], k[1]), _mm256_max_ps(k[2], k[3]));
  __m128 r = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  r = _mm_max_ps(r, _mm_movehl_ps(r, r));
  r = _mm_max_ss(r, _mm_shuffle_ps(r, r, 1));
  return _mm_cvtss_f32(r);
}

// Offer the keys of one block to h.
inline void emit(const Topk4Args& a, TopK& h, int64_t base, const __m256* k) {
  const int64_t nvalid = a.num_classes - base;
  uint32_t me = 0xFFFF, mo = 0xFFFF;
  if (nvalid < kBlock) {
    me = (1u << ((nvalid + 1) / 2)) - 1;
    mo = (1u << (nvalid / 2)) - 1;
  }
  if (h.has_thr) {
    const __m256 thr = _mm256_set1_ps(h.thr);
    uint32_t g[4];
    for (int v = 0; v < 4; ++v) g[v] = uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(k[v], thr, _CMP_GT_OQ)));
    me &= g[0] | (g[1] << 8);
    mo &= g[2] | (g[3] << 8);
  }
  if ((me | mo) == 0) return;
  alignas(32) float key[32];
  for (int v = 0; v < 4; ++v) _mm256_store_ps(key + 8 * v, k[v]);
  append_even_odd(h, me, mo, base, key);
}

// Scan blocks [c0, c1) for queries q .. q + Q - 1: offer every block (one pass), or record each
// block's best key in a.bmax (pass 1 of the two-pass top-k, see block_bound in topk.h).
template <int Q, bool kBias, bool kTwoPass>
void scan_group(const Topk4Args& a, const Task& t, int64_t q, int64_t c0, int64_t c1) {
  const int64_t tstride = 2 * a.P * 16;
  for (int64_t blk = c0; blk < c1; ++blk) {
    __m256i even[Q], odd[Q];
    block_sums<Q>(a.packed + blk * a.P * kBlock, a.P, a.qlut + q * tstride, tstride, even, odd);
    const int64_t base = blk * kBlock;
    for (int j = 0; j < Q; ++j) {
      __m256 k[4];
      if (kTwoPass) {
        float best = -INFINITY;  // a partial last block takes no part in the bound
        if (base + kBlock <= a.num_classes) {
          if (kBias) {
            block_keys<kBias>(a, q + j, base, even[j], odd[j], k);
            best = block_max(k);
          } else {
            best = max_u16(even[j], odd[j]);  // the key is the sum: no conversion needed
          }
        }
        a.bmax[(q + j) * a.nblocks + blk] = best;
        if (a.bsums != nullptr) store_sums(a.bsums + ((q + j - t.q0) * a.nblocks + blk) * kBlock, even[j], odd[j]);
      } else {
        block_keys<kBias>(a, q + j, base, even[j], odd[j], k);
        emit(a, t.topk[q + j - t.q0], base, k);
      }
    }
  }
}

template <bool kBias, bool kTwoPass>
void scan_all(const Topk4Args& a, const Task& t) {
  const int64_t cb = chunk_blocks(a.P);
  for (int64_t c0 = t.blk0; c0 < t.blk1; c0 += cb) {
    const int64_t c1 = min64(t.blk1, c0 + cb);
    int64_t q = t.q0;
    for (; q + kGroup <= t.q1; q += kGroup) scan_group<kGroup, kBias, kTwoPass>(a, t, q, c0, c1);
    switch (t.q1 - q) {
      case 3: scan_group<3, kBias, kTwoPass>(a, t, q, c0, c1); break;
      case 2: scan_group<2, kBias, kTwoPass>(a, t, q, c0, c1); break;
      case 1: scan_group<1, kBias, kTwoPass>(a, t, q, c0, c1); break;
      default: break;
    }
  }
}

template <bool kBias>
void topk4_impl(const Topk4Args& a, const Task& t) {
  const int64_t nb = t.blk1 - t.blk0, tstride = 2 * a.P * 16;
  if (!use_two_pass(a, t)) {
    scan_all<kBias, false>(a, t);
    return;
  }
  uint32_t* sel = a.select + t.id * (a.nblocks + 16);
  uint16_t* sums = a.bsums != nullptr ? a.bsums + t.id * a.sums_queries * a.nblocks * kBlock : nullptr;
  // pass 1 then pass 2 per sub-batch of queries, whose kept sums stay in cache (topk.h)
  const int64_t sub = sums != nullptr ? a.sums_queries : t.q1 - t.q0;
  for (int64_t s0 = t.q0; s0 < t.q1; s0 += sub) {
    Task st = t;
    st.q0 = s0;
    st.q1 = min64(t.q1, s0 + sub);
    st.topk = t.topk + (s0 - t.q0);
    Topk4Args sa = a;
    sa.bsums = sums;
    scan_all<kBias, true>(sa, st);
    for (int64_t q = st.q0; q < st.q1; ++q) {  // pass 2
      TopK& h = t.topk[q - t.q0];
      const float* bm = a.bmax + q * a.nblocks;
      const float T = block_bound(h, bm + t.blk0, nb, sel);
      // the blocks to revisit, listed without a branch per block, then visited with their kept
      // sums requested kAhead blocks early (see scan_avx512.cpp)
      const int64_t n = revisit_blocks(bm, t.blk0, t.blk1, T, a.num_classes, sel);
      constexpr int64_t kAhead = 8;
      const uint16_t* qsums = sums != nullptr ? sums + (q - s0) * a.nblocks * kBlock : nullptr;
      if (qsums != nullptr)
        for (int64_t i = 0; i < n && i < kAhead; ++i) _mm_prefetch(reinterpret_cast<const char*>(qsums + sel[i] * kBlock), _MM_HINT_T0);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t blk = sel[i], base = blk * kBlock;
        __m256i even, odd;
        __m256 k[4];
        if (qsums != nullptr) {
          if (i + kAhead < n)
            _mm_prefetch(reinterpret_cast<const char*>(qsums + sel[i + kAhead] * kBlock), _MM_HINT_T0);
          load_sums(qsums + blk * kBlock, &even, &odd);
        } else {
          block_sums<1>(a.packed + blk * a.P * kBlock, a.P, a.qlut + q * tstride, tstride, &even, &odd);
        }
        block_keys<kBias>(a, q, base, even, odd, k);
        emit(a, h, base, k);
      }
    }
  }
}

// lut_score_quantized: the de-quantized score of every class of blocks [c0, c1) for queries
// q .. q + Q - 1, written to a.out in natural class order with the float ops of qscore4_generic:
// float(sum) * inv_scale + (offset + bias).
template <int Q>
void qscore_group(const Topk4Args& a, int64_t q, int64_t c0, int64_t c1) {
  const int64_t tstride = 2 * a.P * 16;
  alignas(32) float btail[kBlock], otail[kBlock];
  for (int64_t blk = c0; blk < c1; ++blk) {
    __m256i even[Q], odd[Q];
    block_sums<Q>(a.packed + blk * a.P * kBlock, a.P, a.qlut + q * tstride, tstride, even, odd);
    const int64_t base = blk * kBlock, valid = min64(kBlock, a.num_classes - base);
    const float* b = nullptr;
    if (a.bias != nullptr) {
      b = a.bias + base;
      if (valid < kBlock) {  // the last block: its bias zero-padded (never read past the end)
        for (int i = 0; i < kBlock; ++i) btail[i] = i < valid ? a.bias[base + i] : 0.f;
        b = btail;
      }
    }
    for (int j = 0; j < Q; ++j) {
      // unpack: lo = classes 0-7 | 16-23, hi = classes 8-15 | 24-31 (16-bit lanes, per 128-bit half)
      const __m256i lo = _mm256_unpacklo_epi16(even[j], odd[j]), hi = _mm256_unpackhi_epi16(even[j], odd[j]);
      const __m128i part[4] = {_mm256_castsi256_si128(lo), _mm256_castsi256_si128(hi), _mm256_extracti128_si256(lo, 1),
                               _mm256_extracti128_si256(hi, 1)};
      const __m256 inv = _mm256_set1_ps(a.inv_scale[q + j]), off = _mm256_set1_ps(a.offset[q + j]);
      float* o = valid == kBlock ? a.out + (q + j) * a.out_stride + base : otail;
      for (int g = 0; g < 4; ++g) {  // classes 8g .. 8g + 7
        const __m256 s = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(part[g]));
        const __m256 add = b != nullptr ? _mm256_add_ps(off, _mm256_loadu_ps(b + 8 * g)) : _mm256_add_ps(off, _mm256_setzero_ps());
        _mm256_storeu_ps(o + 8 * g, _mm256_add_ps(_mm256_mul_ps(s, inv), add));
      }
      if (valid < kBlock)
        for (int64_t i = 0; i < valid; ++i) a.out[(q + j) * a.out_stride + base + i] = otail[i];
    }
  }
}

void qscore4_impl(const Topk4Args& a, const Task& t) {
  const int64_t cb = chunk_blocks(a.P);
  for (int64_t c0 = t.blk0; c0 < t.blk1; c0 += cb) {
    const int64_t c1 = min64(t.blk1, c0 + cb);
    int64_t q = t.q0;
    for (; q + kGroup <= t.q1; q += kGroup) qscore_group<kGroup>(a, q, c0, c1);
    switch (t.q1 - q) {
      case 3: qscore_group<3>(a, q, c0, c1); break;
      case 2: qscore_group<2>(a, q, c0, c1); break;
      case 1: qscore_group<1>(a, q, c0, c1); break;
      default: break;
    }
  }
}

// Exact float sums for 4-bit codes (lut_score): 16 float entries per table are two ymm halves; vpermps
// looks up the low 3 bits of each index in both, and a blend on bit 3 picks the half. Same adds in
// the same order as sums4_float (low nibble, then high nibble, p = 0, 1, ...), so the same floats.
void sums4_float_avx2(const float* lut, const uint8_t* codes, int64_t P, float* acc) {
  __m256 a[4];
  for (int g = 0; g < 4; ++g) a[g] = _mm256_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    const float* lo = lut + (2 * p) * 16;
    const float* hi = lo + 16;
    const __m256 lo0 = _mm256_loadu_ps(lo), lo1 = _mm256_loadu_ps(lo + 8);
    const __m256 hi0 = _mm256_loadu_ps(hi), hi1 = _mm256_loadu_ps(hi + 8);
    for (int g = 0; g < 4; ++g) {
      const __m256i c =
          _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + p * kBlock + 8 * g)));
      const __m256i h = _mm256_srli_epi32(c, 4);
      // blendv reads the sign bit: bit 3 of the low nibble (c << 28), bit 7 of the byte (c << 24)
      const __m256 vl = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo0, c), _mm256_permutevar8x32_ps(lo1, c),
                                         _mm256_castsi256_ps(_mm256_slli_epi32(c, 28)));
      const __m256 vh = _mm256_blendv_ps(_mm256_permutevar8x32_ps(hi0, h), _mm256_permutevar8x32_ps(hi1, h),
                                         _mm256_castsi256_ps(_mm256_slli_epi32(c, 24)));
      a[g] = _mm256_add_ps(a[g], vl);
      a[g] = _mm256_add_ps(a[g], vh);
    }
  }
  for (int g = 0; g < 4; ++g) _mm256_storeu_ps(acc + 8 * g, a[g]);
}

}  // namespace

void topk4_avx2(const Topk4Args& a, const Task& t) {
  if (a.bias != nullptr) {
    topk4_impl<true>(a, t);
  } else {
    topk4_impl<false>(a, t);
  }
}
void compute_lut_avx2(const float* q, const float* c, const float* ct, int64_t b0, int64_t b1, int64_t M,
                      int64_t K, int64_t dsub, float* out) {
  compute_lut_generic(q, c, ct, b0, b1, M, K, dsub, out);
}
void qscore4_avx2(const Topk4Args& a, const Task& t) { qscore4_impl(a, t); }
void topk8_avx2(const FloatScanArgs& a, const Task& t) { topk8_generic(a, t); }
void score4_avx2(const FloatScanArgs& a, const Task& t) {
  score_float_generic(a, t, sums4_float_avx2, 2 * a.P * 16, a.P);
}
void score8_avx2(const FloatScanArgs& a, const Task& t) { score8_generic(a, t); }

}  // namespace cpu
}  // namespace torchaq
