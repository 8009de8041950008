// Plain-data interface between the ATen driver (scan.cpp) and the per-ISA kernels
// (scan_scalar.cpp, scan_avx2.cpp, scan_avx512.cpp).
//
// The ISA files are compiled with different -m flags. They must not instantiate any inline
// function or template with external linkage (std::vector, at::Tensor methods, ...): the linker
// keeps one copy of such a COMDAT symbol, possibly the AVX-512 one, and the scalar path would
// then execute AVX-512 instructions. Hence this header is raw pointers and PODs only, and the
// shared helpers (topk.h, scan_generic.h) live in anonymous namespaces.
#pragma once
#include <cstdint>

namespace torchaq {
namespace cpu {

constexpr int64_t kBlock = 32;  // classes per packed block (torchaq.ops.layout.BLOCK; _C.layout() exposes it to the tests)

// Running top-k of one query, ranked by key descending then class index ascending (a total
// order, so every ISA path, thread split and scan order returns the same top-k). Candidates
// whose key beats `thr` are appended without branching; when the buffer can no longer take a
// whole block it is cut back to its best k by a radix select (topk.h) and thr rises to the k-th
// best key. A binary heap or std::nth_element instead pays mispredicted branches on every
// candidate, which at k = 100 cost more than the scan itself. Storage is owned by the driver:
// key/idx hold cap + 16 entries (16 of slack for full-vector stores), key2/idx2 are scratch.
struct TopK {
  float* key;
  int32_t* idx;
  int32_t* idx2;   // 2 * cap entries of scratch for topk_compact
  float* key2;     // cap entries of scratch
  int64_t size;
  int64_t k;
  int64_t cap;     // >= 2k + 2 * kBlock
  float thr;       // when has_thr: only keys > thr can still enter the top k
  int has_thr;
};

// One scan task: queries [q0, q1) against code blocks [blk0, blk1).
struct Task {
  int64_t q0, q1;
  int64_t blk0, blk1;
  TopK* topk;         // q1 - q0 running top-k (top-k ops only)
  uint8_t* work;      // ISA scratch, >= q1 - q0 times scratch_bytes_per_query(P) bytes, 64-aligned
  int64_t id;         // task number, < number of tasks
};

// 4-bit top-k on uint8-quantized LUTs.
struct Topk4Args {
  const uint8_t* packed;  // (nblocks, P, 32)
  int64_t P;              // bytes per class = ceil(M / 2)
  int64_t num_classes;
  const uint8_t* qlut;    // (B, 2P, 16) quantized LUT, rows >= M are zero
  const float* inv_scale; // (B,) 1 / scale
  const float* offset;    // (B,) sum_m min_m lut[b, m, :]
  const float* bias;      // (N,) natural order, or null
  const float* bias_tail; // (32,) bias of the last block's classes, zero-padded (with a bias)
  int64_t nblocks;
  float* bmax;            // (B, nblocks) scratch for the two-pass top-k of the SIMD kernels
  uint16_t* bsums;        // (tasks, two_pass_sub_batch(nblocks, P), nblocks, 32) pass-1 sums (even classes,
                          // then odd) of one sub-batch of queries per task (topk.h), kept for pass 2,
                          // or null: pass 2 then re-scans its blocks (large B * nblocks)
  uint32_t* select;       // (number of tasks, nblocks + 16) scratch for block_bound
  int64_t sums_queries;   // queries of kept sums per task: min(queries per task, two_pass_sub_batch)
  float* out;             // lut_score_quantized only: (B, N) de-quantized scores (null for the top-k)
  int64_t out_stride;     // floats from one query's row of out to the next (>= N)
};

// Float-LUT scans: exact float sums (8-bit top-k, 4-bit and 8-bit lut_score).
struct FloatScanArgs {
  const uint8_t* packed;  // (nblocks, P, 32)
  int64_t P;
  int64_t M;
  int64_t num_classes;
  const float* lut;       // 4-bit: (B, 2P, 16) with zero rows >= M; 8-bit: (B, M, 256)
  const float* bias;      // (N,) or null
  float* out;             // lut_score only: (B, N)
};

// Bytes of per-query scratch any ISA kernel may use in Task::work.
inline int64_t scratch_bytes_per_query(int64_t P) { return 64 * (P + 2); }

#define TORCHAQ_DECLARE_ISA(isa)                                   \
  void compute_lut_##isa(const float* q, const float* c, const float* ct, int64_t b0, int64_t b1, int64_t M, \
                         int64_t K, int64_t dsub, float* out);     \
  void topk4_##isa(const Topk4Args& a, const Task& t);             \
  void qscore4_##isa(const Topk4Args& a, const Task& t);           \
  void topk8_##isa(const FloatScanArgs& a, const Task& t);         \
  void score4_##isa(const FloatScanArgs& a, const Task& t);        \
  void score8_##isa(const FloatScanArgs& a, const Task& t);

TORCHAQ_DECLARE_ISA(scalar)
TORCHAQ_DECLARE_ISA(avx2)
TORCHAQ_DECLARE_ISA(avx512)
#undef TORCHAQ_DECLARE_ISA

}  // namespace cpu
}  // namespace torchaq
