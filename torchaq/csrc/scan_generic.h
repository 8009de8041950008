// Portable kernels, written so that -O3 auto-vectorises them over the 32 classes of a block.
// Included by every ISA file (anonymous namespace: one copy per file, compiled with that file's
// flags). The summation order is fixed (subspace 0, 1, ..., M-1 for each class), so every ISA
// returns bit-identical float sums, and the integer 4-bit sums are exact by construction.
#pragma once
#include <cstring>

#include "topk.h"

namespace torchaq {
namespace cpu {
namespace {

// Blocks scanned per query before moving to the next query: the chunk of codes stays in L2
// while every query of the task streams over it (codes are read from DRAM once per task).
inline int64_t chunk_blocks(int64_t P) {
  int64_t c = (int64_t(256) << 10) / (P * kBlock);
  return c < 1 ? 1 : c;
}

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Offer the 32 keys of block `blk` (natural class order) to h; classes >= n are padding.
inline void offer_block(TopK& h, const float* key, int64_t blk, int64_t n) {
  const int64_t base = blk * kBlock;
  const int64_t valid = min64(kBlock, n - base);
  for (int64_t i = 0; i < valid; ++i) topk_append(h, key[i], base + i, topk_takes(h, key[i]));
  topk_block_done(h);
}

// dsub values for which compute_lut reads the codebooks as given and sums each dot product as a
// pairwise tree (below).
inline bool is_tree_dsub(int64_t dsub) { return dsub >= 1 && dsub <= 16 && (dsub & (dsub - 1)) == 0; }

// LUT[b, m, j] = <q[b, m*dsub : (m+1)*dsub], C[m, j]> for b in [b0, b1).
// Power-of-two dsub <= 16 (every quantizer of d = 2^k): from the codebooks as given, c = (M, K,
// dsub); each dot product is summed as the pairwise tree ((p0 + p1) + (p2 + p3)) + ..., the
// order in which the AVX-512 kernel reduces adjacent lanes, so both give identical floats.
// Other dsub: from the codebooks transposed, ct = (M, dsub, K), summed t = 0, 1, ... in order.
inline void compute_lut_generic(const float* q, const float* c, const float* ct, int64_t b0, int64_t b1, int64_t M,
                                int64_t K, int64_t dsub, float* out) {
  const int64_t d = M * dsub;
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t m = 0; m < M; ++m) {
      float* o = out + (b * M + m) * K;
      const float* qm = q + b * d + m * dsub;
      if (ct == nullptr) {
        for (int64_t j = 0; j < K; ++j) {
          const float* cj = c + (m * K + j) * dsub;
          float p[16];
          for (int64_t t = 0; t < dsub; ++t) p[t] = qm[t] * cj[t];
          for (int64_t w = 1; w < dsub; w *= 2)
            for (int64_t t = 0; t + w < dsub; t += 2 * w) p[t] += p[t + w];
          o[j] = p[0];
        }
        continue;
      }
      const float* cm = ct + m * dsub * K;
      for (int64_t j = 0; j < K; ++j) o[j] = 0.f;
      for (int64_t t = 0; t < dsub; ++t) {
        const float x = qm[t];
        for (int64_t j = 0; j < K; ++j) o[j] += x * cm[t * K + j];
      }
    }
  }
}

// 4-bit: one block's 32 sums over the tables (2P, 16), subspace 2p (low nibble) then 2p + 1 added
// in order p = 0, 1, ... (the order every SIMD kernel keeps): uint8 tables into exact uint32 sums
// (the quantized scans), float tables into float sums (lut_score).
template <typename Entry, typename Acc>
inline void block_sums4(const Entry* table, const uint8_t* codes, int64_t P, Acc* acc) {
  for (int i = 0; i < kBlock; ++i) acc[i] = Acc(0);
  for (int64_t p = 0; p < P; ++p) {
    const Entry* lo = table + (2 * p) * 16;
    const Entry* hi = lo + 16;
    for (int i = 0; i < kBlock; ++i) {
      const uint8_t c = codes[p * kBlock + i];
      acc[i] += Acc(lo[c & 15]);
      acc[i] += Acc(hi[c >> 4]);
    }
  }
}

// The portable 4-bit scans' traversal: for each chunk of blocks (kept in cache), each query of the
// task, each block in increasing order, fn(q, blk, sum) with that block's exact uint32 sums over the
// query's quantized tables.
template <typename Fn>
inline void each_block_sums4(const Topk4Args& a, const Task& t, Fn&& fn) {
  const int64_t P = a.P, cb = chunk_blocks(P);
  for (int64_t c0 = t.blk0; c0 < t.blk1; c0 += cb) {
    const int64_t c1 = min64(t.blk1, c0 + cb);
    for (int64_t q = t.q0; q < t.q1; ++q) {
      const uint8_t* T = a.qlut + q * (2 * P * 16);
      for (int64_t blk = c0; blk < c1; ++blk) {
        uint32_t sum[kBlock];
        block_sums4(T, a.packed + blk * P * kBlock, P, sum);
        fn(q, blk, sum);
      }
    }
  }
}

// 4-bit top-k on the uint8 LUT: exact uint32 sums of the quantized entries.
inline void topk4_generic(const Topk4Args& a, const Task& t) {
  each_block_sums4(a, t, [&](int64_t q, int64_t blk, const uint32_t* sum) {
    float key[kBlock];
    const int64_t base = blk * kBlock;
    for (int i = 0; i < kBlock; ++i) {
      // same float operations, same order as the SIMD kernels: s * inv + (offset + bias)
      key[i] = a.bias == nullptr
                   ? float(sum[i])
                   : float(sum[i]) * a.inv_scale[q] + (a.offset[q] + (base + i < a.num_classes ? a.bias[base + i] : 0.f));
    }
    offer_block(t.topk[q - t.q0], key, blk, a.num_classes);
  });
}

// lut_score_quantized: every class's de-quantized uint8-LUT score written to a.out (rows a.out_stride apart),
//   float(sum) * inv_scale + (offset + bias)      (bias 0 without one; the float ops of lut_topk's keys)
inline void qscore4_generic(const Topk4Args& a, const Task& t) {
  each_block_sums4(a, t, [&](int64_t q, int64_t blk, const uint32_t* sum) {
    const int64_t base = blk * kBlock, valid = min64(kBlock, a.num_classes - base);
    float* o = a.out + q * a.out_stride + base;
    for (int64_t i = 0; i < valid; ++i)
      o[i] = float(sum[i]) * a.inv_scale[q] + (a.offset[q] + (a.bias != nullptr ? a.bias[base + i] : 0.f));
  });
}

// Exact float sums of one block for one query over a float LUT. 4-bit: lut is (2P, 16).
inline void sums4_float(const float* lut, const uint8_t* codes, int64_t P, float* acc) { block_sums4(lut, codes, P, acc); }

// 8-bit: lut is (M, 256).
inline void sums8_float(const float* lut, const uint8_t* codes, int64_t M, float* acc) {
  for (int i = 0; i < kBlock; ++i) acc[i] = 0.f;
  for (int64_t m = 0; m < M; ++m) {
    const float* row = lut + m * 256;
    for (int i = 0; i < kBlock; ++i) acc[i] += row[codes[m * kBlock + i]];
  }
}

using SumsFn = void (*)(const float*, const uint8_t*, int64_t, float*);

// Top-k over exact float sums (used for 8-bit codes).
inline void topk_float_generic(const FloatScanArgs& a, const Task& t, SumsFn sums, int64_t lut_stride,
                               int64_t depth) {
  const int64_t cb = chunk_blocks(a.P);
  for (int64_t c0 = t.blk0; c0 < t.blk1; c0 += cb) {
    const int64_t c1 = min64(t.blk1, c0 + cb);
    for (int64_t q = t.q0; q < t.q1; ++q) {
      TopK& h = t.topk[q - t.q0];
      for (int64_t blk = c0; blk < c1; ++blk) {
        float acc[kBlock];
        sums(a.lut + q * lut_stride, a.packed + blk * a.P * kBlock, depth, acc);
        if (a.bias != nullptr) {
          const int64_t base = blk * kBlock;
          const int64_t valid = min64(kBlock, a.num_classes - base);
          for (int64_t i = 0; i < valid; ++i) acc[i] += a.bias[base + i];
        }
        offer_block(h, acc, blk, a.num_classes);
      }
    }
  }
}

// All scores written to out (B, N): lut_score.
inline void score_float_generic(const FloatScanArgs& a, const Task& t, SumsFn sums, int64_t lut_stride,
                                int64_t depth) {
  const int64_t cb = chunk_blocks(a.P);
  for (int64_t c0 = t.blk0; c0 < t.blk1; c0 += cb) {
    const int64_t c1 = min64(t.blk1, c0 + cb);
    for (int64_t q = t.q0; q < t.q1; ++q) {
      for (int64_t blk = c0; blk < c1; ++blk) {
        float acc[kBlock];
        sums(a.lut + q * lut_stride, a.packed + blk * a.P * kBlock, depth, acc);
        const int64_t base = blk * kBlock;
        const int64_t valid = min64(kBlock, a.num_classes - base);
        float* o = a.out + q * a.num_classes + base;
        if (a.bias != nullptr) {
          for (int64_t i = 0; i < valid; ++i) o[i] = acc[i] + a.bias[base + i];
        } else {
          std::memcpy(o, acc, sizeof(float) * valid);
        }
      }
    }
  }
}

inline void topk8_generic(const FloatScanArgs& a, const Task& t) {
  topk_float_generic(a, t, sums8_float, a.M * 256, a.M);
}
inline void score8_generic(const FloatScanArgs& a, const Task& t) {
  score_float_generic(a, t, sums8_float, a.M * 256, a.M);
}
inline void score4_generic(const FloatScanArgs& a, const Task& t) {
  score_float_generic(a, t, sums4_float, 2 * a.P * 16, a.P);
}

}  // namespace
}  // namespace cpu
}  // namespace torchaq
