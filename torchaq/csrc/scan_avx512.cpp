// AVX-512 (F, BW, VL, DQ) kernels. Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq only
// (see setup.py); called only when the CPU reports those features (scan.cpp).
//
// 4-bit top-k, the hot path (the scheme of FAISS fast-scan / ScaNN LUT16, written afresh for the
// torchaq layout): one 64-byte load holds two packed rows = four subspaces for the 32 classes of
// a block. vpshufb looks up 64 uint8 LUT entries per instruction (each 128-bit lane has its own
// 16-entry table, so the expanded table holds [T(2p), T(2p), T(2p+2), T(2p+2)] for the low
// nibbles and the odd subspaces for the high nibbles). Sums are accumulated in uint16 with the
// lo/hi trick: A += r (16-bit words: even byte + 256 * odd byte), B += r >> 8 (odd bytes);
// at the end even = A - (B << 8) and odd = B, exact modulo 2^16 because the quantization
// guarantees every true sum is < 2^16.
#include <immintrin.h>

#include <cstdlib>

#include "scan_generic.h"
#include "simd_util.h"

namespace torchaq {
namespace cpu {
namespace {

constexpr int kGroup = 4;  // queries sharing one code load (2 accumulators each)

// Expand the (2P, 16) quantized table of one query into ceil(P/2) x [lo 64 B | hi 64 B].
void expand_tables(const uint8_t* T, int64_t P, uint8_t* xt) {
  const int64_t PT = (P + 1) / 2;
  for (int64_t t = 0; t < PT; ++t) {
    for (int h = 0; h < 2; ++h) {
      const int64_t p = 2 * t + h;
      uint8_t* lo = xt + t * 128 + 32 * h;
      uint8_t* hi = lo + 64;
      for (int r = 0; r < 2; ++r) {
        if (p < P) {
          std::memcpy(lo + 16 * r, T + (2 * p) * 16, 16);
          std::memcpy(hi + 16 * r, T + (2 * p + 1) * 16, 16);
        } else {  // odd P: no row p; the masked code load reads zeros, the zero table adds 0
          std::memset(lo + 16 * r, 0, 16);
          std::memset(hi + 16 * r, 0, 16);
        }
      }
    }
  }
}

inline void lookup_add(const uint8_t* tab, __m512i lo, __m512i hi, __m512i& A, __m512i& B) {
  const __m512i r0 = _mm512_shuffle_epi8(_mm512_loadu_si512(tab), lo);
  const __m512i r1 = _mm512_shuffle_epi8(_mm512_loadu_si512(tab + 64), hi);
  A = _mm512_add_epi16(A, r0);
  A = _mm512_add_epi16(A, r1);
  B = _mm512_add_epi16(B, _mm512_srli_epi16(r0, 8));
  B = _mm512_add_epi16(B, _mm512_srli_epi16(r1, 8));
}

// uint16 sums of the 32 classes of one block for Q queries (expanded tables xt, xstride apart),
// as even classes (even[j]) and odd classes (odd[j]).
// Not inlined on purpose: inlined into the scan loops (whose two-pass bookkeeping keeps many values
// live), the compiler spilled the table pointers and the loop counter of this, the hottest loop, to
// the stack.
template <int Q>
__attribute__((noinline)) void block_sums(const uint8_t* codes, int64_t P, const uint8_t* xt, int64_t xstride, __m256i* even,
                       __m256i* odd) {
  const int64_t PF = P / 2;
  const __m512i m0f = _mm512_set1_epi8(0x0f);
  __m512i A[Q], B[Q];
  for (int j = 0; j < Q; ++j) A[j] = B[j] = _mm512_setzero_si512();
  for (int64_t r = 0; r < PF; ++r) {
    const __m512i c = _mm512_loadu_si512(codes + 64 * r);
    const __m512i lo = _mm512_and_si512(c, m0f);
    const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(c, 4), m0f);
    for (int j = 0; j < Q; ++j) lookup_add(xt + j * xstride + r * 128, lo, hi, A[j], B[j]);
  }
  if (P & 1) {  // last single row: load 32 bytes, the upper half of the table is zero
    const __m512i c = _mm512_maskz_loadu_epi8(0xFFFFFFFFull, codes + 64 * PF);
    const __m512i lo = _mm512_and_si512(c, m0f);
    const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(c, 4), m0f);
    for (int j = 0; j < Q; ++j) lookup_add(xt + j * xstride + PF * 128, lo, hi, A[j], B[j]);
  }
  for (int j = 0; j < Q; ++j) {
    // the two 256-bit halves hold the same 32 classes (different subspaces): fold them
    const __m256i Af = _mm256_add_epi16(_mm512_castsi512_si256(A[j]), _mm512_extracti64x4_epi64(A[j], 1));
    odd[j] = _mm256_add_epi16(_mm512_castsi512_si256(B[j]), _mm512_extracti64x4_epi64(B[j], 1));
    even[j] = _mm256_sub_epi16(Af, _mm256_slli_epi16(odd[j], 8));
  }
}

// block_sums with GFNI: one gf2p8affineqb (a bit matrix applied to every byte: x >> 4 within the
// byte) extracts the high nibbles instead of a 16-bit shift and a mask. Same lookups, same sums.
constexpr long long kShr4Matrix = 0x1020408000000000LL;  // row i (byte 7 - i) picks bit i + 4, i < 4
template <int Q>
__attribute__((noinline, target("gfni"))) void block_sums_gfni(const uint8_t* codes, int64_t P, const uint8_t* xt, int64_t xstride, __m256i* even,
                       __m256i* odd) {
  const int64_t PF = P / 2;
  const __m512i m0f = _mm512_set1_epi8(0x0f);
  __m512i A[Q], B[Q];
  for (int j = 0; j < Q; ++j) A[j] = B[j] = _mm512_setzero_si512();
  for (int64_t r = 0; r < PF; ++r) {
    const __m512i c = _mm512_loadu_si512(codes + 64 * r);
    const __m512i lo = _mm512_and_si512(c, m0f);
    const __m512i hi = _mm512_gf2p8affine_epi64_epi8(c, _mm512_set1_epi64(kShr4Matrix), 0);
    for (int j = 0; j < Q; ++j) lookup_add(xt + j * xstride + r * 128, lo, hi, A[j], B[j]);
  }
  if (P & 1) {  // last single row: load 32 bytes, the upper half of the table is zero
    const __m512i c = _mm512_maskz_loadu_epi8(0xFFFFFFFFull, codes + 64 * PF);
    const __m512i lo = _mm512_and_si512(c, m0f);
    const __m512i hi = _mm512_gf2p8affine_epi64_epi8(c, _mm512_set1_epi64(kShr4Matrix), 0);
    for (int j = 0; j < Q; ++j) lookup_add(xt + j * xstride + PF * 128, lo, hi, A[j], B[j]);
  }
  for (int j = 0; j < Q; ++j) {
    // the two 256-bit halves hold the same 32 classes (different subspaces): fold them
    const __m256i Af = _mm256_add_epi16(_mm512_castsi512_si256(A[j]), _mm512_extracti64x4_epi64(A[j], 1));
    odd[j] = _mm256_add_epi16(_mm512_castsi512_si256(B[j]), _mm512_extracti64x4_epi64(B[j], 1));
    even[j] = _mm256_sub_epi16(Af, _mm256_slli_epi16(odd[j], 8));
  }
}

// block_sums or block_sums_gfni (the same sums; GFNI where the CPU has it, see topk4_avx512).
template <int Q, bool kGfni>
inline void sums_of_block(const uint8_t* codes, int64_t P, const uint8_t* xt, int64_t xstride, __m256i* even,
                          __m256i* odd) {
  if (kGfni)
    block_sums_gfni<Q>(codes, P, xt, xstride, even, odd);
  else
    block_sums<Q>(codes, P, xt, xstride, even, odd);
}

// Keys of one block in even/odd order: the uint16 sum itself without a bias (de-quantized at
// the end, a monotone map), else the de-quantized score plus bias.
template <bool kBias>
inline void block_keys(const Topk4Args& a, int64_t q, int64_t base, __m256i even, __m256i odd, __m512& ke,
                       __m512& ko) {
  ke = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(even));
  ko = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(odd));
  if (kBias) {
    const __m512 inv = _mm512_set1_ps(a.inv_scale[q]);
    const __m512 off = _mm512_set1_ps(a.offset[q]);
    // the bias in natural order, split into the even and the odd classes
    const float* b = base + kBlock <= a.num_classes ? a.bias + base : a.bias_tail;
    const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
    const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i od = _mm512_add_epi32(ev, _mm512_set1_epi32(1));
    ke = _mm512_add_ps(_mm512_mul_ps(ke, inv), _mm512_add_ps(off, _mm512_permutex2var_ps(b0, ev, b1)));
    ko = _mm512_add_ps(_mm512_mul_ps(ko, inv), _mm512_add_ps(off, _mm512_permutex2var_ps(b0, od, b1)));
  }
}

// Offer the keys of one block (classes base + 2i in ke, base + 2i + 1 in ko) to h.
inline void emit(const Topk4Args& a, TopK& h, int64_t base, __m512 ke, __m512 ko) {
  const int64_t nvalid = a.num_classes - base;
  uint32_t me = 0xFFFF, mo = 0xFFFF;
  if (nvalid < kBlock) {
    me = (1u << ((nvalid + 1) / 2)) - 1;
    mo = (1u << (nvalid / 2)) - 1;
  }
  if (h.has_thr) {
    const __m512 thr = _mm512_set1_ps(h.thr);
    me &= _mm512_cmp_ps_mask(ke, thr, _CMP_GT_OQ);
    mo &= _mm512_cmp_ps_mask(ko, thr, _CMP_GT_OQ);
  }
  if ((me | mo) == 0) return;
  // compress the selected lanes into a register, store a full vector (TopK has 16 of slack);
  // the register form of vcompress is fast where the store form is microcoded
  const __m512i ie = _mm512_add_epi32(_mm512_set1_epi32(int32_t(base)),
                                      _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30));
  const __m512i io = _mm512_add_epi32(ie, _mm512_set1_epi32(1));
  _mm512_storeu_ps(h.key + h.size, _mm512_maskz_compress_ps(__mmask16(me), ke));
  _mm512_storeu_si512(h.idx + h.size, _mm512_maskz_compress_epi32(__mmask16(me), ie));
  h.size += __builtin_popcount(me);
  _mm512_storeu_ps(h.key + h.size, _mm512_maskz_compress_ps(__mmask16(mo), ko));
  _mm512_storeu_si512(h.idx + h.size, _mm512_maskz_compress_epi32(__mmask16(mo), io));
  h.size += __builtin_popcount(mo);
  topk_block_done(h);
}

// Scan blocks [c0, c1) for queries q .. q + Q - 1: offer every block (one pass), or record each
// block's best key in a.bmax (pass 1 of the two-pass top-k, see block_bound).
template <int Q, bool kBias, bool kTwoPass, bool kGfni>
void scan_group(const Topk4Args& a, const Task& t, int64_t q, const uint8_t* xt, int64_t xstride, int64_t c0,
                int64_t c1) {
  for (int64_t blk = c0; blk < c1; ++blk) {
    __m256i even[Q], odd[Q];
    sums_of_block<Q, kGfni>(a.packed + blk * a.P * kBlock, a.P, xt, xstride, even, odd);
    const int64_t base = blk * kBlock;
    for (int j = 0; j < Q; ++j) {
      __m512 ke, ko;
      if (kTwoPass) {
        float best = -INFINITY;  // a partial last block takes no part in the bound
        if (base + kBlock <= a.num_classes) {
          if (kBias) {
            block_keys<kBias>(a, q + j, base, even[j], odd[j], ke, ko);
            best = _mm512_reduce_max_ps(_mm512_max_ps(ke, ko));
          } else {
            best = max_u16(even[j], odd[j]);  // the key is the sum: no conversion needed
          }
        }
        a.bmax[(q + j) * a.nblocks + blk] = best;
        if (a.bsums != nullptr) store_sums(a.bsums + ((q + j - t.q0) * a.nblocks + blk) * kBlock, even[j], odd[j]);
      } else {
        block_keys<kBias>(a, q + j, base, even[j], odd[j], ke, ko);
        emit(a, t.topk[q + j - t.q0], base, ke, ko);
      }
    }
  }
}

template <bool kBias, bool kTwoPass, bool kGfni>
void scan_all(const Topk4Args& a, const Task& t, const uint8_t* xt, int64_t xstride) {
  const int64_t cb = chunk_blocks(a.P);
  for (int64_t c0 = t.blk0; c0 < t.blk1; c0 += cb) {
    const int64_t c1 = min64(t.blk1, c0 + cb);
    int64_t q = t.q0;
    for (; q + kGroup <= t.q1; q += kGroup)
      scan_group<kGroup, kBias, kTwoPass, kGfni>(a, t, q, xt + (q - t.q0) * xstride, xstride, c0, c1);
    const uint8_t* x = xt + (q - t.q0) * xstride;
    switch (t.q1 - q) {
      case 3: scan_group<3, kBias, kTwoPass, kGfni>(a, t, q, x, xstride, c0, c1); break;
      case 2: scan_group<2, kBias, kTwoPass, kGfni>(a, t, q, x, xstride, c0, c1); break;
      case 1: scan_group<1, kBias, kTwoPass, kGfni>(a, t, q, x, xstride, c0, c1); break;
      default: break;
    }
  }
}

template <bool kBias, bool kGfni>
void topk4_impl(const Topk4Args& a, const Task& t) {
  const int64_t P = a.P, xstride = (P + 1) / 2 * 128;
  uint8_t* xt = t.work;
  for (int64_t q = t.q0; q < t.q1; ++q) expand_tables(a.qlut + q * (2 * P * 16), P, xt + (q - t.q0) * xstride);
  const int64_t nb = t.blk1 - t.blk0;
  if (!use_two_pass(a, t)) {
    scan_all<kBias, false, kGfni>(a, t, xt, xstride);
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
    scan_all<kBias, true, kGfni>(sa, st, xt + (s0 - t.q0) * xstride, xstride);
    for (int64_t q = st.q0; q < st.q1; ++q) {  // pass 2
      TopK& h = t.topk[q - t.q0];
      const float* bm = a.bmax + q * a.nblocks;
      const float T = block_bound(h, bm + t.blk0, nb, sel);
      const uint8_t* x = xt + (q - t.q0) * xstride;
      // List the blocks to revisit without a branch per block (sel is free again after
      // block_bound), then revisit them with their kept sums requested kAhead blocks early (a
      // branch per block would leave one miss at a time in flight).
      const int64_t n = revisit_blocks(bm, t.blk0, t.blk1, T, a.num_classes, sel);
      constexpr int64_t kAhead = 8;
      const uint16_t* qsums = sums != nullptr ? sums + (q - s0) * a.nblocks * kBlock : nullptr;
      if (qsums != nullptr)
        for (int64_t i = 0; i < n && i < kAhead; ++i) _mm_prefetch(reinterpret_cast<const char*>(qsums + sel[i] * kBlock), _MM_HINT_T0);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t blk = sel[i], base = blk * kBlock;
        __m256i even, odd;
        __m512 ke, ko;
        if (qsums != nullptr) {
          if (i + kAhead < n)
            _mm_prefetch(reinterpret_cast<const char*>(qsums + sel[i + kAhead] * kBlock), _MM_HINT_T0);
          load_sums(qsums + blk * kBlock, &even, &odd);
        } else {
          sums_of_block<1, kGfni>(a.packed + blk * P * kBlock, P, x, xstride, &even, &odd);
        }
        block_keys<kBias>(a, q, base, even, odd, ke, ko);
        emit(a, h, base, ke, ko);
      }
    }
  }
}

// lut_score_quantized: the de-quantized score of every class of blocks [c0, c1) for queries
// q .. q + Q - 1, written to a.out in natural class order (the float ops of qscore4_generic).
template <int Q, bool kGfni>
void qscore_group(const Topk4Args& a, int64_t q, const uint8_t* xt, int64_t xstride, int64_t c0, int64_t c1) {
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
  const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i od = _mm512_add_epi32(ev, _mm512_set1_epi32(1));
  for (int64_t blk = c0; blk < c1; ++blk) {
    __m256i even[Q], odd[Q];
    sums_of_block<Q, kGfni>(a.packed + blk * a.P * kBlock, a.P, xt, xstride, even, odd);
    const int64_t base = blk * kBlock, valid = min64(kBlock, a.num_classes - base);
    __m512 be = _mm512_setzero_ps(), bo = _mm512_setzero_ps();
    if (a.bias != nullptr) {  // the bias in natural order, split into the even and the odd classes
      const __mmask16 m0 = __mmask16(valid >= 16 ? 0xFFFF : (1u << valid) - 1);
      const __mmask16 m1 = __mmask16(valid >= 32 ? 0xFFFF : valid <= 16 ? 0 : (1u << (valid - 16)) - 1);
      const __m512 b0 = _mm512_maskz_loadu_ps(m0, a.bias + base), b1 = _mm512_maskz_loadu_ps(m1, a.bias + base + 16);
      be = _mm512_permutex2var_ps(b0, ev, b1);
      bo = _mm512_permutex2var_ps(b0, od, b1);
    }
    for (int j = 0; j < Q; ++j) {
      const __m512 inv = _mm512_set1_ps(a.inv_scale[q + j]), off = _mm512_set1_ps(a.offset[q + j]);
      const __m512 ke = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(even[j])), inv),
                                      _mm512_add_ps(off, be));
      const __m512 ko = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(odd[j])), inv),
                                      _mm512_add_ps(off, bo));
      float* o = a.out + (q + j) * a.out_stride + base;
      if (valid == kBlock) {
        _mm512_storeu_ps(o, _mm512_permutex2var_ps(ke, first, ko));
        _mm512_storeu_ps(o + 16, _mm512_permutex2var_ps(ke, second, ko));
      } else {
        const __mmask16 m0 = __mmask16(valid >= 16 ? 0xFFFF : (1u << valid) - 1);
        const __mmask16 m1 = __mmask16(valid <= 16 ? 0 : (1u << (valid - 16)) - 1);
        _mm512_mask_storeu_ps(o, m0, _mm512_permutex2var_ps(ke, first, ko));
        _mm512_mask_storeu_ps(o + 16, m1, _mm512_permutex2var_ps(ke, second, ko));
      }
    }
  }
}

template <bool kGfni>
void qscore4_impl(const Topk4Args& a, const Task& t) {
  const int64_t P = a.P, xstride = (P + 1) / 2 * 128, cb = chunk_blocks(P);
  uint8_t* xt = t.work;
  for (int64_t q = t.q0; q < t.q1; ++q) expand_tables(a.qlut + q * (2 * P * 16), P, xt + (q - t.q0) * xstride);
  for (int64_t c0 = t.blk0; c0 < t.blk1; c0 += cb) {
    const int64_t c1 = min64(t.blk1, c0 + cb);
    int64_t q = t.q0;
    for (; q + kGroup <= t.q1; q += kGroup) qscore_group<kGroup, kGfni>(a, q, xt + (q - t.q0) * xstride, xstride, c0, c1);
    const uint8_t* x = xt + (q - t.q0) * xstride;
    switch (t.q1 - q) {
      case 3: qscore_group<3, kGfni>(a, q, x, xstride, c0, c1); break;
      case 2: qscore_group<2, kGfni>(a, q, x, xstride, c0, c1); break;
      case 1: qscore_group<1, kGfni>(a, q, x, xstride, c0, c1); break;
      default: break;
    }
  }
}

// Exact float sums for 4-bit codes: vpermps looks up 16 float entries (one zmm) per instruction.
void sums4_float_avx512(const float* lut, const uint8_t* codes, int64_t P, float* acc) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    const __m512 tlo = _mm512_loadu_ps(lut + (2 * p) * 16);
    const __m512 thi = _mm512_loadu_ps(lut + (2 * p + 1) * 16);
    const __m512i i0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + p * kBlock)));
    const __m512i i1 =
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + p * kBlock + 16)));
    // same order as the portable kernel: low nibble (subspace 2p) first, then 2p + 1
    a0 = _mm512_add_ps(a0, _mm512_permutexvar_ps(i0, tlo));  // vpermps uses the low 4 index bits
    a1 = _mm512_add_ps(a1, _mm512_permutexvar_ps(i1, tlo));
    a0 = _mm512_add_ps(a0, _mm512_permutexvar_ps(_mm512_srli_epi32(i0, 4), thi));
    a1 = _mm512_add_ps(a1, _mm512_permutexvar_ps(_mm512_srli_epi32(i1, 4), thi));
  }
  _mm512_storeu_ps(acc, a0);
  _mm512_storeu_ps(acc + 16, a1);
}

// compute_lut for a power-of-two D = dsub <= 16 and K % 16 == 0, without transposing the
// codebooks: 16 rows of C_m are D vectors (each lane one product q[t] * C_m[j, t]); adjacent
// lanes are then added pairwise, halving the vectors at each level, until one vector holds the 16
// dot products -- the pairwise order of compute_lut_generic.
template <int D>
void lut_tree(const float* q, const float* c, int64_t b0, int64_t b1, int64_t M, int64_t K, float* out) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const __m512i lane_t = _mm512_and_si512(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(D - 1));
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t m = 0; m < M; ++m) {
      const __m512 qm = _mm512_permutexvar_ps(lane_t, _mm512_maskz_loadu_ps(__mmask16((1u << D) - 1), q + (b * M + m) * D));
      for (int64_t j0 = 0; j0 < K; j0 += 16) {
        const float* cm = c + (m * K + j0) * D;
        __m512 v[D];
        for (int i = 0; i < D; ++i) v[i] = _mm512_mul_ps(_mm512_loadu_ps(cm + 16 * i), qm);
        for (int n = D; n > 1; n /= 2)
          for (int i = 0; i < n / 2; ++i)
            v[i] = _mm512_add_ps(_mm512_permutex2var_ps(v[2 * i], even, v[2 * i + 1]),
                                 _mm512_permutex2var_ps(v[2 * i], odd, v[2 * i + 1]));
        _mm512_storeu_ps(out + (b * M + m) * K + j0, v[0]);
      }
    }
  }
}

}  // namespace

void topk4_avx512(const Topk4Args& a, const Task& t) {
  // GFNI where the CPU has it (TORCHAQ_NO_GFNI=1 turns it off: the tests compare both paths)
  static const bool has_gfni = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("gfni") != 0;
  }();
  const char* off = std::getenv("TORCHAQ_NO_GFNI");
  const bool gfni = has_gfni && !(off != nullptr && off[0] == '1');
  if (a.bias != nullptr) {
    gfni ? topk4_impl<true, true>(a, t) : topk4_impl<true, false>(a, t);
  } else {
    gfni ? topk4_impl<false, true>(a, t) : topk4_impl<false, false>(a, t);
  }
}
void qscore4_avx512(const Topk4Args& a, const Task& t) {
  static const bool has_gfni = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("gfni") != 0;
  }();
  const char* off = std::getenv("TORCHAQ_NO_GFNI");
  (has_gfni && !(off != nullptr && off[0] == '1')) ? qscore4_impl<true>(a, t) : qscore4_impl<false>(a, t);
}
void compute_lut_avx512(const float* q, const float* c, const float* ct, int64_t b0, int64_t b1, int64_t M,
                        int64_t K, int64_t dsub, float* out) {
  if (ct != nullptr || K % 16 != 0) {
    compute_lut_generic(q, c, ct, b0, b1, M, K, dsub, out);
    return;
  }
  switch (dsub) {
    case 1: lut_tree<1>(q, c, b0, b1, M, K, out); break;
    case 2: lut_tree<2>(q, c, b0, b1, M, K, out); break;
    case 4: lut_tree<4>(q, c, b0, b1, M, K, out); break;
    case 8: lut_tree<8>(q, c, b0, b1, M, K, out); break;
    case 16: lut_tree<16>(q, c, b0, b1, M, K, out); break;
    default: compute_lut_generic(q, c, ct, b0, b1, M, K, dsub, out); break;  // not reached: see scan.cpp
  }
}
void topk8_avx512(const FloatScanArgs& a, const Task& t) { topk8_generic(a, t); }
void score4_avx512(const FloatScanArgs& a, const Task& t) {
  score_float_generic(a, t, sums4_float_avx512, 2 * a.P * 16, a.P);
}
void score8_avx512(const FloatScanArgs& a, const Task& t) { score8_generic(a, t); }

}  // namespace cpu
}  // namespace torchaq
