// Running top-k (see TopK in scan_kernels.h), shared by every ISA file. Anonymous namespace on
// purpose: each translation unit gets its own copy compiled with its own flags, and the
// std::nth_element instantiation below is internal because its comparator type is.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>

#include "scan_kernels.h"

namespace torchaq {
namespace cpu {
namespace {

// Unsigned integer with the order of the float key (-0.0 counted as +0.0, as float compares do).
inline uint32_t order_bits(float f) {
  f += 0.0f;  // -0.0 -> +0.0 (not removed by the compiler: no -ffast-math)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u ^ (uint32_t(int32_t(u) >> 31) | 0x80000000u);
}

inline float from_order_bits(uint32_t u) {
  u = (u & 0x80000000u) ? (u ^ 0x80000000u) : ~u;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct IdxLess {
  bool operator()(int32_t a, int32_t b) const { return a < b; }
};

// Order bits of the k-th largest of keys[0, n) (1 <= k <= n), by an MSB-first radix select
// that narrows the candidate set after each byte (so later passes touch few keys); *remaining is
// set to how many keys equal to it rank within the k largest. tmp: n entries of scratch. Bytes
// on which all remaining candidates agree cost no histogram (typically the exponent byte, and
// the low byte of integer-valued uint16 sums). No data-dependent branches per key.
inline uint32_t kth_largest_bits(const float* keys, int64_t n, int64_t k, int64_t* remaining_out, uint32_t* tmp) {
  for (int64_t i = 0; i < n; ++i) tmp[i] = order_bits(keys[i]);
  int64_t m = n;  // candidates: tmp[0, m), all sharing the digits chosen so far
  uint32_t prefix = 0;
  int64_t remaining = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    uint32_t all_and = ~0u, all_or = 0;
    for (int64_t i = 0; i < m; ++i) {
      all_and &= tmp[i];
      all_or |= tmp[i];
    }
    const uint32_t byte = 0xFFu << shift;
    if (((all_and ^ all_or) & byte) == 0) {  // one digit only: every candidate goes on
      prefix |= all_and & byte;
      continue;
    }
    uint32_t hist[256] = {};
    for (int64_t i = 0; i < m; ++i) ++hist[(tmp[i] >> shift) & 255];
    int d = 255;
    for (; d > 0; --d) {
      if (int64_t(hist[d]) >= remaining) break;
      remaining -= hist[d];
    }
    prefix |= uint32_t(d) << shift;
    int64_t j = 0;
    for (int64_t i = 0; i < m; ++i) {  // keep the candidates with digit d (in place, forward)
      tmp[j] = tmp[i];
      j += ((tmp[i] >> shift) & 255) == uint32_t(d);
    }
    m = j;
  }
  *remaining_out = remaining;
  return prefix;
}

// Keep the best k of the buffer (branch-free partition around the k-th key; ties at the k-th key
// keep the smallest indices).
inline void topk_compact(TopK& t) {
  const int64_t n = t.size;
  int64_t remaining;
  // idx2 is free until the partition below
  const uint32_t prefix = kth_largest_bits(t.key, n, t.k, &remaining, reinterpret_cast<uint32_t*>(t.idx2));
  int64_t g = 0, e = 0;
  int32_t* eq = t.idx2 + t.cap;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = order_bits(t.key[i]);
    t.key2[g] = t.key[i];
    t.idx2[g] = t.idx[i];
    g += u > prefix;
    eq[e] = t.idx[i];
    e += u == prefix;
  }
  if (e > remaining) std::nth_element(eq, eq + remaining, eq + e, IdxLess());
  std::memcpy(t.key, t.key2, sizeof(float) * size_t(g));
  std::memcpy(t.idx, t.idx2, sizeof(int32_t) * size_t(g));
  const float thr = from_order_bits(prefix);
  for (int64_t j = 0; j < remaining; ++j) {
    t.key[g + j] = thr;
    t.idx[g + j] = eq[j];
  }
  t.size = g + remaining;  // == k
  t.thr = thr;
  t.has_thr = 1;
}

// Append (key, idx) if take; no branch. The caller calls topk_block_done after each block.
inline void topk_append(TopK& t, float key, int64_t idx, bool take) {
  t.key[t.size] = key;
  t.idx[t.size] = int32_t(idx);
  t.size += take;
}

// Keys equal to thr are dropped: every kept candidate came from an earlier block, hence has a
// smaller index, and ranks first. So blocks must be offered in increasing class order.
inline bool topk_takes(const TopK& t, float key) { return !t.has_thr || key > t.thr; }

// Make room for the next block (at most kBlock appends).
inline void topk_block_done(TopK& t) {
  if (t.size > t.cap - kBlock) topk_compact(t);
}

// Two-pass top-k (4-bit SIMD kernels): pass 1 stores each block's best key, bmax[i] for the
// i-th of nb blocks (-inf for a partial last block). If k blocks have a best key >= T, then k
// classes score >= T, so the k-th best score is >= T: pass 2 revisits only the blocks whose
// best key is >= T (about k of them, plus the partial block; their sums kept from pass 1, or
// re-scanned) and offers keys >= T. This leaves
// no per-block branch in pass 1, where a one-pass running top-k takes a mispredicted branch in
// every block that holds a candidate (hundreds per query at k = 100). Requires nb >= k.
// T is found by bisection on the keys' order bits, one vectorised counting pass per step, and
// need not be the exact k-th largest maximum: the search stops as soon as between k and
// k + kBoundSlack blocks reach the candidate (pass 2 then reads a few more blocks, cheaper than
// more steps). Returns T, and arms t's threshold at "key >= T" unless T is -inf or nan (then all
// pass). tmp: nb entries of scratch.
constexpr int64_t kBoundSlack = 8;
inline float block_bound(TopK& t, const float* bmax, int64_t nb, uint32_t* tmp) {
  uint32_t lo = ~0u, hi = 0;
  for (int64_t i = 0; i < nb; ++i) {
    tmp[i] = order_bits(bmax[i]);
    lo = tmp[i] < lo ? tmp[i] : lo;
    hi = tmp[i] > hi ? tmp[i] : hi;
  }
  // invariant: at least k blocks reach lo (all do at the minimum, and nb >= k); fewer than k
  // reach hi + 1
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo) / 2 + 1;  // in (lo, hi]
    int64_t reach = 0;
    for (int64_t i = 0; i < nb; ++i) reach += tmp[i] >= mid;
    if (reach >= t.k) {
      lo = mid;
      if (reach <= t.k + kBoundSlack) break;
    } else {
      hi = mid - 1;
    }
  }
  const float T = from_order_bits(lo);
  if (T == T && T > -INFINITY) {
    t.thr = std::nextafter(T, -INFINITY);
    t.has_thr = 1;
  }
  return T;
}

// Pass 2's list of blocks to revisit: those whose pass-1 maximum reaches T, plus the last block
// when it is partial. Written without a branch per block (sel[n] is always written, n advances
// only for a kept block); returns the count.
inline int64_t revisit_blocks(const float* bmax, int64_t blk0, int64_t blk1, float T, int64_t num_classes,
                              uint32_t* sel) {
  int64_t n = 0;
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    sel[n] = uint32_t(blk);
    n += (bmax[blk] >= T) | (blk * kBlock + kBlock > num_classes);
  }
  return n;
}

// The two-pass kernels run pass 1 and pass 2 on sub-batches of this many queries of a task (a
// multiple of 4, at least 4), so that the pass-1 sums kept for pass 2 -- 64 bytes per block and
// query -- stay in the core's cache between the two passes instead of streaming B * nblocks * 64
// bytes to memory and back; the codes are read once per sub-batch instead (from the shared cache at
// V = 30k). The driver allocates the kept sums for one sub-batch per task.
// When the codes themselves do not fit the last-level cache (more than kCodesInCache bytes: V =
// 262k at d = 640, any LLM head at d = 4096), every sub-batch streams them from DRAM, so a
// sub-batch of 4 reads them B / 4 times: there the kept sums get a larger budget (they are
// written once and pass 2 reads only the few revisited blocks' 64 bytes, so they need not stay
// in cache), and each code chunk is read once for up to kKeptSumsBudgetLarge / (64 nblocks) queries.
constexpr int64_t kKeptSumsBudget = int64_t(512) << 10;
constexpr int64_t kKeptSumsBudgetLarge = int64_t(16) << 20;
constexpr int64_t kCodesInCache = int64_t(16) << 20;
inline int64_t two_pass_sub_batch(int64_t nblocks, int64_t P) {
  const int64_t budget = nblocks * P * kBlock > kCodesInCache ? kKeptSumsBudgetLarge : kKeptSumsBudget;
  const int64_t n = budget / (nblocks * kBlock * 2) / 4 * 4;
  return n < 4 ? 4 : n;
}

// One pass suits a small k (few blocks ever hold a candidate) or few blocks (pass 2 would revisit
// most of them). The crossover k was found with benchmarks/cpu_scan.py before pass 2 kept the
// pass-1 sums and has not been re-tuned since; it moves with V and the ISA.
constexpr int64_t kTwoPassMinK = 24;
inline bool use_two_pass(const Topk4Args& a, const Task& t) {
  const int64_t k = t.topk[0].k;
  return a.bmax != nullptr && k >= kTwoPassMinK && t.blk1 - t.blk0 > 2 * k + 2;
}

// Offer the classes of one block selected by the SIMD kernels' masks, whose keys come in
// "even/odd" order (key[i], i < 16: class base + 2i; key[16 + i]: class base + 2i + 1).
inline void append_even_odd(TopK& h, uint32_t me, uint32_t mo, int64_t base, const float* key) {
  for (int i = 0; i < 16; ++i) topk_append(h, key[i], base + 2 * i, (me >> i) & 1);
  for (int i = 0; i < 16; ++i) topk_append(h, key[16 + i], base + 2 * i + 1, (mo >> i) & 1);
  topk_block_done(h);
}

}  // namespace
}  // namespace cpu
}  // namespace torchaq
