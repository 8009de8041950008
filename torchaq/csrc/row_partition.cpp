// torchaq::row_log_partition on CPU: each row's exact log-sum-exp of l / T over all V classes (and
// over l >= floor), l = h W^T + b, without a (B, V) matrix. Semantics and the pure-torch reference:
// torchaq/ops/row_partition.py.
//
// The logits come tile by tile from for_each_logit_tile (logit_tiles.h: tiles of a width fixed by d
// alone, threads taking whole groups of tiles); each row divides its tile by T, and the
// cross-entropy's tile kernel gives the tile's (max, sum exp(x - max)), again with the classes below
// the row's floor set to -inf. A group folds its tiles in class order in float64; the groups are
// folded in order at the end. Nothing depends on the batch or the threads, so a row's values are
// bitwise the same alone or in any batch. Cost: B V d multiply-adds, one read of W per call (per row
// at batch 1: the bound is memory bandwidth).
#include "row_partition.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "linear_ce_kernels.h"
#include "logit_tiles.h"

namespace torchaq {
namespace cpu {
namespace {

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
  const at::Tensor bias = bias_in ? bias_in->detach().to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor floor = floor_in ? floor_in->detach().contiguous() : at::Tensor();
  const int64_t B = h.size(0), d = h.size(1), V = weight.size(0);
  at::Tensor out = at::empty({B, 2}, h.options());
  if (B == 0) return out;

  const int64_t tw = tile_width(d), n_groups = num_tile_groups(V, d);
  // per group and row: the group's running log-sum-exp, full and truncated
  std::vector<Lse> full(size_t(n_groups) * B), trunc(size_t(n_groups) * B);
  const float* bp = bias_in ? bias.data_ptr<float>() : nullptr;
  const float* fp = floor_in ? floor.data_ptr<float>() : nullptr;
  const float temp = float(temperature);
  const LceStatsFn stats = lce_stats_kernel();
  for_each_logit_tile(h, weight, bp, [&](int64_t g, int64_t, int64_t w, float* logits) {
    std::vector<float> masked(w);
    for (int64_t b = 0; b < B; ++b) {
      float* tile = logits + b * tw;
      const float f = fp != nullptr ? fp[b] : -INFINITY;
      int64_t below = 0;
      for (int64_t j = 0; j < w; ++j) below += tile[j] < f;
      if (below > 0 && below < w)  // the truncated tile, compared on the logits before the division
        for (int64_t j = 0; j < w; ++j) masked[j] = tile[j] < f ? -INFINITY : tile[j] / temp;
      for (int64_t j = 0; j < w; ++j) tile[j] /= temp;
      float m, s;
      stats(tile, 1, w, &m, &s, nullptr);
      full[g * B + b].add(m, s);
      if (below == 0) {
        trunc[g * B + b].add(m, s);
      } else if (below < w) {
        stats(masked.data(), 1, w, &m, &s, nullptr);
        trunc[g * B + b].add(m, s);
      }
    }
  });

  float* op = out.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    Lse f, t;
    for (int64_t g = 0; g < n_groups; ++g) {
      f.add(full[g * B + b].m, full[g * B + b].s);
      t.add(trunc[g * B + b].m, trunc[g * B + b].s);
    }
    op[2 * b] = f.value();
    op[2 * b + 1] = t.value();
  }
  return out;
}

}  // namespace cpu
}  // namespace torchaq
