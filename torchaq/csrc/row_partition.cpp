// torchaq::row_log_partition on CPU: each row's exact log-sum-exp of l / T over all V classes (and
// over l >= floor), l = h W^T + b, without a (B, V) matrix. Semantics and the pure-torch reference:
// torchaq/ops/row_partition.py.
//
// The classes are cut into tiles of `tile_width(d)` classes (a width fixed by d alone) and the
// tiles into groups of kTilesPerGroup; threads take whole groups. For each tile, the weight rows
// (converted to float32 once if needed) stay in cache, a few (<= 16 KB) in L1 at a time, while every
// row of h takes its dot products (the dots kernel of rescore_topk: one summation order on every
// ISA); each row then adds the bias and divides by
// T; the cross-entropy's tile kernel gives the tile's (max, sum exp(x - max)) per row, and again
// with the classes below the row's floor set to -inf. A group folds its tiles in class order in
// float64; the groups are folded in order at the end. Nothing depends on the batch or the threads,
// so a row's values are bitwise the same alone or in any batch. Cost: B V d multiply-adds, one read
// of W per call (per row at batch 1: the bound is memory bandwidth).
#include "row_partition.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "linear_ce_kernels.h"
#include "rescore_kernels.h"

namespace torchaq {
namespace cpu {
namespace {

constexpr int64_t kTilesPerGroup = 16;

// Classes per tile: 64 while 64 weight rows fit in ~100 KB (they are reread by every row), fewer for
// large d, a multiple of 8 (the SIMD width of the tile kernel).
int64_t tile_width(int64_t d) { return std::max<int64_t>(8, std::min<int64_t>(64, (int64_t(1) << 15) / std::max<int64_t>(d, 1) / 8 * 8)); }

// A running log-sum-exp, m + log(s), folded in a fixed order.
struct Lse {
  double m = -INFINITY, s = 0.0;
  void add(double tm, double ts) {
    if (!(ts > 0.0)) return;  // an empty tile (every class masked)
    if (tm > m) {
      s = s * std::exp(m - tm) + ts;
      m = tm;
    } else {
      s += ts * std::exp(tm - m);
    }
  }
  float value() const { return s > 0.0 ? float(m + std::log(s)) : -INFINITY; }
};

void check_args(const at::Tensor& h, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                double temperature, const std::optional<at::Tensor>& floor) {
  TORCH_CHECK_TYPE(h.dim() == 2 && h.is_floating_point(), "h must be a floating-point (B, d) tensor, got shape ",
                   h.sizes());
  TORCH_CHECK_TYPE(weight.dim() == 2 && weight.is_floating_point(), "weight must be a floating-point (V, d) tensor");
  TORCH_CHECK_VALUE(weight.size(1) == h.size(1), "h has d = ", h.size(1), " but weight has d = ", weight.size(1));
  if (bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->is_floating_point(),
                      "bias must be a floating-point (", weight.size(0), ",) tensor");
  }
  if (floor) {
    TORCH_CHECK_VALUE(floor->dim() == 1 && floor->size(0) == h.size(0) && floor->scalar_type() == at::kFloat,
                      "floor must be a float32 (", h.size(0), ",) tensor");
  }
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature), "temperature must be a finite number > 0, got ",
                    temperature);
  TORCH_CHECK_VALUE(weight.size(0) < (int64_t(1) << 31), "weight must have < 2^31 rows");
}

}  // namespace

at::Tensor row_log_partition_cpu(const at::Tensor& h_in, const at::Tensor& weight_in,
                                 const std::optional<at::Tensor>& bias_in, double temperature,
                                 const std::optional<at::Tensor>& floor_in) {
  check_args(h_in, weight_in, bias_in, temperature, floor_in);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor h = h_in.detach().to(at::kFloat).contiguous();
  TORCH_CHECK_VALUE(h.numel() == 0 || at::isfinite(h).all().item<bool>(),
                    "row_log_partition: h must be finite (got inf or nan)");
  const at::Tensor weight = weight_in.detach().contiguous();
  const bool convert = weight.scalar_type() != at::kFloat;
  const at::Tensor bias = bias_in ? bias_in->detach().to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor floor = floor_in ? floor_in->detach().contiguous() : at::Tensor();
  const int64_t B = h.size(0), d = h.size(1), V = weight.size(0);
  at::Tensor out = at::empty({B, 2}, h.options());
  if (B == 0) return out;

  const int64_t tw = tile_width(d), sub = std::max<int64_t>(1, std::min<int64_t>(8, 4096 / d));
  const int64_t n_tiles = (V + tw - 1) / tw, n_groups = (n_tiles + kTilesPerGroup - 1) / kTilesPerGroup;
  // per group and row: the group's (m, s) for the full and the truncated sum
  std::vector<double> part(size_t(n_groups) * B * 4);
  const float* hp = h.data_ptr<float>();
  const float* bp = bias_in ? bias.data_ptr<float>() : nullptr;
  const float* fp = floor_in ? floor.data_ptr<float>() : nullptr;
  const float temp = float(temperature);
  const DotsFn dots = dots_kernel();
  const LceStatsFn stats = lce_stats_kernel();
  std::vector<int32_t> ids(tw);
  for (int64_t j = 0; j < tw; ++j) ids[j] = int32_t(j);

  at::parallel_for(0, n_groups, 1, [&](int64_t g0, int64_t g1) {
    std::vector<float> rows(convert ? tw * d : 0), logits(B * tw), masked(tw);
    std::vector<Lse> full(B), trunc(B);
    for (int64_t g = g0; g < g1; ++g) {
      std::fill(full.begin(), full.end(), Lse());
      std::fill(trunc.begin(), trunc.end(), Lse());
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
        // the dots in sub-tiles of weight rows that stay in L1 while every row of h takes them
        for (int64_t j0 = 0; j0 < w; j0 += sub)
          for (int64_t b = 0; b < B; ++b)
            dots(hp + b * d, wp + j0 * d, d, d, ids.data(), std::min(sub, w - j0), logits.data() + b * tw + j0);
        for (int64_t b = 0; b < B; ++b) {
          float* tile = logits.data() + b * tw;
          if (bp != nullptr)
            for (int64_t j = 0; j < w; ++j) tile[j] += bp[c0 + j];
          const float f = fp != nullptr ? fp[b] : -INFINITY;
          int64_t below = 0;
          for (int64_t j = 0; j < w; ++j) below += tile[j] < f;
          if (below > 0 && below < w)  // the truncated tile, compared on the logits before the division
            for (int64_t j = 0; j < w; ++j) masked[j] = tile[j] < f ? -INFINITY : tile[j] / temp;
          for (int64_t j = 0; j < w; ++j) tile[j] /= temp;
          float m, s;
          stats(tile, 1, w, &m, &s, nullptr);
          full[b].add(m, s);
          if (below == 0) {
            trunc[b].add(m, s);
          } else if (below < w) {
            stats(masked.data(), 1, w, &m, &s, nullptr);
            trunc[b].add(m, s);
          }
        }
      }
      for (int64_t b = 0; b < B; ++b) {
        double* p = part.data() + (size_t(g) * B + b) * 4;
        p[0] = full[b].m, p[1] = full[b].s, p[2] = trunc[b].m, p[3] = trunc[b].s;
      }
    }
  });

  float* op = out.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    Lse full, trunc;
    for (int64_t g = 0; g < n_groups; ++g) {
      const double* p = part.data() + (size_t(g) * B + b) * 4;
      full.add(p[0], p[1]);
      trunc.add(p[2], p[3]);
    }
    op[2 * b] = full.value();
    op[2 * b + 1] = trunc.value();
  }
  return out;
}

}  // namespace cpu
}  // namespace torchaq
