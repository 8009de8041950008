// The final step of every CPU top-k: merge each query's partial running top-k (TopK, topk.h) into
// the sorted output. Header-only (templates in an anonymous namespace, like topk.h); included by
// the ATen drivers only (scan.cpp, row_topk.cpp), never by the ISA files.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <vector>

#include "topk.h"

namespace torchaq {
namespace cpu {
namespace {

// Merge the TB partial top-k of every query into the sorted output; value(q, key) de-quantizes.
// Sorting packs (key order bits, inverted index) into one uint64, so that a plain descending
// integer sort is the (key desc, index asc) order.
// With sorted = false each query's k winners come in no particular order (a selection instead of
// a sort: callers that re-score the candidates, such as layer_topk, do not need the order).
template <typename ValueFn>
void merge_topk(TopK* topk, int64_t B, int64_t TB, int64_t kk, float* values, int64_t* indices,
                ValueFn value, bool sorted = true) {
  // a sort of TB * k keys per query: two queries already pay for a thread
  at::parallel_for(0, B, 2, [&](int64_t begin, int64_t end) {
    thread_local std::vector<uint64_t> cand;  // reused: no allocation per call
    for (int64_t q = begin; q < end; ++q) {
      cand.clear();
      for (int64_t bi = 0; bi < TB; ++bi) {
        TopK& t = topk[bi * B + q];
        if (t.size > t.k) topk_compact(t);
        for (int64_t i = 0; i < t.size; ++i)
          cand.push_back(uint64_t(order_bits(t.key[i])) << 32 | uint64_t(0xFFFFFFFFu - uint32_t(t.idx[i])));
      }
      if (sorted)
        std::sort(cand.begin(), cand.end(), std::greater<uint64_t>());
      else if (int64_t(cand.size()) > kk)
        std::nth_element(cand.begin(), cand.begin() + kk, cand.end(), std::greater<uint64_t>());
      for (int64_t i = 0; i < kk; ++i) {  // every class is offered, so cand.size() >= kk
        const uint64_t c = cand[size_t(i)];
        values[q * kk + i] = value(q, from_order_bits(uint32_t(c >> 32)));
        indices[q * kk + i] = int64_t(0xFFFFFFFFu - uint32_t(c));
      }
    }
  });
}

}  // namespace
}  // namespace cpu
}  // namespace torchaq
