// torchaq::row_topk on CPU: each row's k largest scores of a (B, N) float32 matrix, sorted (value
// desc, index asc), rows independent (one row's answer never depends on the others or on the
// thread count). The two-pass top-k of the 4-bit scans (topk.h) applied to scores already in
// memory: pass 1 takes each 32-class block's maximum; the k-th largest of those (a radix select)
// is a threshold T that k blocks reach; pass 2 offers only the classes of the ~k blocks whose
// maximum reaches T.
// Cost per row: one read of the N scores plus O(k) offers and one sort of ~k keys, where a full
// selection (torch.topk) partitions all N.
#include "row_topk.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include <cmath>
#include <new>
#include <vector>

#include "scan_kernels.h"
#include "topk.h"
#include "topk_merge.h"

namespace torchaq {
namespace cpu {
namespace {

// Each whole 32-class block's maximum into bmax[0, full); returns true if any of them holds a nan.
// (SSE2 on x86-64: max_ps and a > m ? a : m agree, nan included; the compiler will not vectorise
// a float max reduction without -ffast-math.)
bool block_maxima(const float* x, int64_t full, float* bmax) {
#if defined(__SSE2__)
  __m128 bad = _mm_setzero_ps();
  for (int64_t blk = 0; blk < full; ++blk) {
    const float* b = x + blk * kBlock;
    __m128 m[2] = {_mm_loadu_ps(b), _mm_loadu_ps(b + 4)};
    bad = _mm_or_ps(bad, _mm_or_ps(_mm_cmpunord_ps(m[0], m[0]), _mm_cmpunord_ps(m[1], m[1])));
    for (int i = 8; i < kBlock; i += 8) {
      const __m128 v0 = _mm_loadu_ps(b + i), v1 = _mm_loadu_ps(b + i + 4);
      bad = _mm_or_ps(bad, _mm_or_ps(_mm_cmpunord_ps(v0, v0), _mm_cmpunord_ps(v1, v1)));
      m[0] = _mm_max_ps(v0, m[0]);
      m[1] = _mm_max_ps(v1, m[1]);
    }
    __m128 r = _mm_max_ps(m[0], m[1]);
    r = _mm_max_ps(r, _mm_movehl_ps(r, r));
    r = _mm_max_ss(r, _mm_shuffle_ps(r, r, 1));
    bmax[blk] = _mm_cvtss_f32(r);
  }
  return _mm_movemask_ps(bad) != 0;
#else
  bool nan = false;
  for (int64_t blk = 0; blk < full; ++blk) {
    const float* b = x + blk * kBlock;
    float m = b[0];
    for (int i = 0; i < kBlock; ++i) {
      m = b[i] > m ? b[i] : m;
      nan |= b[i] != b[i];
    }
    bmax[blk] = m;
  }
  return nan;
#endif
}

// Offer classes [c0, c1) of one row to t, in increasing class order (what topk_takes assumes).
inline void offer_range(TopK& t, const float* x, int64_t c0, int64_t c1) {
#if defined(__SSE2__)
  if (c1 - c0 == kBlock && t.has_thr) {  // a whole block: compare all 32 keys at once, append the few above
    const __m128 thr = _mm_set1_ps(t.thr);
    uint32_t take = 0;
    for (int i = 0; i < kBlock; i += 4)
      take |= uint32_t(_mm_movemask_ps(_mm_cmpgt_ps(_mm_loadu_ps(x + c0 + i), thr))) << i;
    for (; take != 0; take &= take - 1) {
      const int64_t i = c0 + __builtin_ctz(take);
      topk_append(t, x[i], i, true);
    }
    topk_block_done(t);
    return;
  }
#endif
  for (int64_t i = c0; i < c1; ++i) topk_append(t, x[i], i, topk_takes(t, x[i]));
  topk_block_done(t);
}

// One row into t. bmax: nblocks entries of scratch; tmp, sel: nblocks + 16. Returns false on a nan.
bool row_into(TopK& t, const float* x, int64_t N, float* bmax, uint32_t* tmp, uint32_t* sel) {
  const int64_t full = N / kBlock, nb = (N + kBlock - 1) / kBlock;
  bool nan = block_maxima(x, full, bmax);
  for (int64_t i = full * kBlock; i < N; ++i) nan |= x[i] != x[i];
  if (nan) return false;
  if (full < t.k) {  // too few whole blocks for a bound: offer every class
    for (int64_t blk = 0; blk < nb; ++blk) offer_range(t, x, blk * kBlock, std::min(N, blk * kBlock + kBlock));
    return true;
  }
  // T = the k-th largest block maximum: k blocks reach it, so the k-th best score is >= T and only
  // the blocks whose maximum reaches T can hold a winner (topk.h's two-pass argument, exact T)
  int64_t remaining;
  const float T = from_order_bits(kth_largest_bits(bmax, full, t.k, &remaining, tmp));
  if (T > -INFINITY) {
    t.thr = std::nextafter(T, -INFINITY);
    t.has_thr = 1;
  }
  if (nb > full) bmax[full] = -INFINITY;  // the partial last block is always revisited
  const int64_t n = revisit_blocks(bmax, 0, nb, T, N, sel);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c0 = int64_t(sel[i]) * kBlock;
    offer_range(t, x, c0, std::min(N, c0 + kBlock));
  }
  return true;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> row_topk_cpu(const at::Tensor& scores_in, int64_t k) {
  // the messages of torchaq/ops/row_topk.py's checks (same error types on every backend)
  TORCH_CHECK_TYPE(scores_in.scalar_type() == at::kFloat, "scores must be a float32 tensor, got ",
                   scores_in.scalar_type());
  TORCH_CHECK_VALUE(scores_in.dim() == 2, "scores must be (B, N), got shape ", scores_in.sizes());
  TORCH_CHECK_VALUE(k >= 0, "k must be >= 0, got ", k);
  const int64_t B = scores_in.size(0), N = scores_in.size(1), kk = std::min(k, N);
  TORCH_CHECK_VALUE(N < (int64_t(1) << 31), "row_topk: scores must have < 2^31 columns, got ", N);
  at::Tensor values = at::empty({B, kk}, scores_in.options());
  at::Tensor indices = at::empty({B, kk}, scores_in.options().dtype(at::kLong));
  if (B == 0 || kk == 0) return {values, indices};
  // rows may lie apart (the sampler's scores are the first N columns of a wider buffer): no copy then
  const at::Tensor scores = scores_in.stride(1) == 1 ? scores_in : scores_in.contiguous();
  const int64_t ld = B > 1 ? scores.stride(0) : N;
  const float* x = scores.const_data_ptr<float>();
  // per row: a running top-k (layout of lut_topk_cpu's; see TopK), then one merge with TB = 1
  const int64_t cap = 2 * kk + 2 * kBlock, stride = cap + 16, nb = (N + kBlock - 1) / kBlock;
  std::vector<float> keys(static_cast<size_t>(B * (stride + cap)));
  std::vector<int32_t> ids(static_cast<size_t>(B * (stride + 2 * cap)));
  std::vector<TopK> topk(static_cast<size_t>(B));
  std::vector<uint8_t> bad(static_cast<size_t>(B), 0);
  for (int64_t r = 0; r < B; ++r)
    topk[r] = TopK{keys.data() + r * (stride + cap), ids.data() + r * (stride + 2 * cap),
                   ids.data() + r * (stride + 2 * cap) + stride, keys.data() + r * (stride + cap) + stride, 0, kk, cap,
                   0.f, 0};
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> bmax(static_cast<size_t>(nb));
    std::vector<uint32_t> tmp(static_cast<size_t>(nb + 16)), sel(static_cast<size_t>(nb + 16));
    for (int64_t r = begin; r < end; ++r) bad[r] = !row_into(topk[r], x + r * ld, N, bmax.data(), tmp.data(), sel.data());
  });
  for (int64_t r = 0; r < B; ++r)
    TORCH_CHECK_VALUE(!bad[r], "row_topk: scores must not contain nan (row ", r, " does)");
  merge_topk(topk.data(), B, 1, kk, values.data_ptr<float>(), indices.data_ptr<int64_t>(),
             [](int64_t, float key) { return key; });
  return {values, indices};
}

}  // namespace cpu
}  // namespace torchaq
