// Exact logits of every class in tiles, for the row-wise reductions over all V classes
// (row_partition.cpp, mass_histogram.cpp). Not included by the ISA files.
//
// The classes are cut into tiles of tile_width(d) classes and the tiles into groups of
// kTilesPerGroup; threads take whole groups (at::parallel_for), and a group's tiles are visited in
// class order by one thread. For each tile the weight rows (converted to float32 once if needed)
// stay in cache, a few (<= 16 KB) in L1 at a time, while every row of h takes its dot products (the
// dots kernel of rescore_topk: one summation order on every ISA); then the bias is added. A class's
// logit therefore never depends on the batch or the threads.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "rescore_kernels.h"

namespace torchaq {
namespace cpu {

constexpr int64_t kTilesPerGroup = 16;

// Classes per tile: 64 while 64 weight rows fit in ~100 KB (they are reread by every row), fewer for
// large d, a multiple of 8 (the SIMD width of the tile kernels).
inline int64_t tile_width(int64_t d) {
  return std::max<int64_t>(8, std::min<int64_t>(64, (int64_t(1) << 15) / std::max<int64_t>(d, 1) / 8 * 8));
}

inline int64_t num_tile_groups(int64_t V, int64_t d) {
  const int64_t n_tiles = (V + tile_width(d) - 1) / tile_width(d);
  return (n_tiles + kTilesPerGroup - 1) / kTilesPerGroup;
}

// on_tile(g, c0, w, logits): for every tile of group g, classes [c0, c0 + w), in class order within
// the group; logits is (B, tile_width(d)) row-major, row b holding <h_b, W_c> + bias_c for c0 <= c < c0 + w.
// h: float32 contiguous (B, d); weight: contiguous (V, d) of any floating dtype; bias: float32 or null.
template <class F>
void for_each_logit_tile(const at::Tensor& h, const at::Tensor& weight, const float* bias, const F& on_tile) {
  const int64_t B = h.size(0), d = h.size(1), V = weight.size(0);
  const int64_t tw = tile_width(d), sub = std::max<int64_t>(1, std::min<int64_t>(8, 4096 / d));
  const int64_t n_tiles = (V + tw - 1) / tw, n_groups = num_tile_groups(V, d);
  const bool convert = weight.scalar_type() != at::kFloat;
  const float* hp = h.data_ptr<float>();
  const DotsFn dots = dots_kernel();
  std::vector<int32_t> ids(tw);
  for (int64_t j = 0; j < tw; ++j) ids[j] = int32_t(j);
  at::parallel_for(0, n_groups, 1, [&](int64_t g0, int64_t g1) {
    std::vector<float> rows(convert ? tw * d : 0), logits(B * tw);
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t t = g * kTilesPerGroup; t < std::min(n_tiles, (g + 1) * kTilesPerGroup); ++t) {
        const int64_t c0 = t * tw, w = std::min(tw, V - c0);
        const float* wp;
        if (convert) {  // bf16 / fp16 / fp64 rows: float32 once per tile
          at::Tensor dst = at::from_blob(rows.data(), {w, d}, at::TensorOptions().dtype(at::kFloat));
          dst.copy_(weight.narrow(0, c0, w));
          wp = rows.data();
        } else {
          wp = weight.data_ptr<float>() + c0 * d;
        }
        for (int64_t j0 = 0; j0 < w; j0 += sub)
          for (int64_t b = 0; b < B; ++b)
            dots(hp + b * d, wp + j0 * d, d, d, ids.data(), std::min(sub, w - j0), logits.data() + b * tw + j0);
        if (bias != nullptr)
          for (int64_t b = 0; b < B; ++b)
            for (int64_t j = 0; j < w; ++j) logits[b * tw + j] += bias[c0 + j];
        on_tile(g, c0, w, logits.data());
      }
    }
  });
}

}  // namespace cpu
}  // namespace torchaq
