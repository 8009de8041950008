// CPU kernel of torch.ops.torchaq.layer_sample (schema, reference and contract: torchaq/ops/layer_sample.py):
// the untruncated path of QuantizedSoftmax.sample in one call -- LUT, uint8-LUT scores of every class,
// the head re-scored exactly, the bounds, the proposal weights, the rejection rounds -- so that a
// batch-1 call pays one dispatch instead of a dozen and the Python between them.
//
// It calls the ops' own CPU kernels in the reference's order with the reference's arguments, and
// computes the few scalars between them (the overflow check, top, the rows left to the caller) with
// the float32 operations torch uses there, so its results equal the reference's bit for bit.
#include "layer_sample.h"

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "counter_rng.h"
#include "proposal.h"
#include "reject.h"
#include "rescore.h"
#include "row_topk.h"
#include "scan.h"
#include "tail_bounds.h"

namespace torchaq {
namespace cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_sample_cpu(
    const at::Tensor& h, const at::Tensor& queries, const at::Tensor& codebooks, const at::Tensor& packed,
    int64_t num_classes, const std::optional<at::Tensor>& scan_bias, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& side_rows, const at::Tensor& error_scales,
    const at::Tensor& seeds, int64_t head, double sigmas, double rounding, double temperature, double weight_range,
    int64_t block, int64_t proposals, int64_t rounds) {
  // the checks torchaq/ops/layer_sample.py makes and the composed kernels do not
  TORCH_CHECK_VALUE(h.dim() == 2 && h.is_floating_point(), "h must be a floating-point (B, d) tensor");
  const int64_t B = h.size(0), V = num_classes;
  TORCH_CHECK_VALUE(queries.dim() == 2 && queries.size(0) == B && queries.scalar_type() == at::kFloat,
                    "queries must be a float32 (", B, ", M * dsub) tensor");
  TORCH_CHECK_VALUE(side_rows.dim() == 1 && side_rows.scalar_type() == at::kLong, "side_rows must be an int64 (S,) tensor");
  const int64_t S = side_rows.size(0);
  TORCH_CHECK_VALUE(S < head && head <= V, "head must be in (S=", S, ", V=", V, "], got ", head);
  TORCH_CHECK_VALUE(seeds.dim() == 1 && seeds.size(0) == B && seeds.scalar_type() == at::kLong,
                    "seeds must be an int64 (", B, ",) tensor");
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature), "temperature must be a finite number > 0");
  TORCH_CHECK_VALUE(weight_range > 0 && block >= 1 && proposals >= 1 && rounds >= 0 && rounds <= 30,
                    "weight_range must be > 0, block and proposals >= 1, rounds in [0, 30]");
  const auto long_opts = seeds.options();
  if (B == 0)
    return {at::empty({0}, long_opts), at::empty({0}, h.options().dtype(at::kFloat)),
            at::empty({0}, long_opts.dtype(at::kBool))};
  // a non-finite h would otherwise surface as a non-finite LUT, or where a query's zero-padded subspaces
  // hide it, as nan logits (the layer's sample() leaves this check to the op)
  const at::Tensor hf = h.to(at::kFloat).contiguous();
  TORCH_CHECK_VALUE(all_finite(hf.const_data_ptr<float>(), hf.numel()), "h contains NaN or Inf");
  at::Tensor keys = at::empty({B}, long_opts);
  const at::Tensor seeds_c = seeds.contiguous();
  {
    const int64_t* sp = seeds_c.const_data_ptr<int64_t>();
    int64_t* kp = keys.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) kp[b] = row_key(sp[b]);
  }
  const at::Tensor lut = compute_lut_cpu(queries, codebooks);
  const int64_t width = V + (block - V % block) % block + head + (block - head % block) % block;  // proposal_width
  auto scanned = lut_score_quantized_cpu(lut, packed, V, scan_bias, width);
  at::Tensor buf = std::get<0>(scanned);
  at::Tensor scores = buf.narrow(1, 0, V);
  // the scan's best head - S classes, then the side rows, in each row of one (B, head) tensor
  const at::Tensor best = std::get<1>(row_topk_cpu(scores, head - S)).contiguous();
  at::Tensor classes = at::empty({B, head}, long_opts);
  {
    const at::Tensor side = side_rows.contiguous();
    const int64_t* bp = best.const_data_ptr<int64_t>();
    const int64_t* sp = side.const_data_ptr<int64_t>();
    int64_t* cp = classes.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      std::memcpy(cp + b * head, bp + b * (head - S), sizeof(int64_t) * size_t(head - S));
      std::memcpy(cp + b * head + head - S, sp, sizeof(int64_t) * size_t(S));
    }
  }
  auto ranked = rescore_topk_cpu(h, weight, bias, classes, head);
  const at::Tensor logits = std::get<0>(ranked).contiguous();
  classes = std::get<1>(ranked);
  const at::Tensor upper_max = tail_bounds_cpu(scores, error_scales, hf, sigmas, std::get<1>(scanned), rounding, classes);
  const int64_t H = logits.size(1);
  const float t = float(temperature), span = float(weight_range * temperature);
  at::Tensor top = at::empty({B}, logits.options());
  at::Tensor risky = at::empty({B}, long_opts.dtype(at::kBool));
  const float* lp = logits.const_data_ptr<float>();
  const float* up = upper_max.const_data_ptr<float>();
  float* tp = top.data_ptr<float>();
  bool* rp = risky.data_ptr<bool>();
  for (int64_t b = 0; b < B; ++b) {
    const float l0 = lp[b * H], u = up[b];
    TORCH_CHECK_VALUE(l0 / t < INFINITY && u / t < INFINITY, "temperature=", temperature,
                      " is so small that logits / temperature overflow float32");
    rp[b] = u - l0 > span;
    const float shifted = u - span;
    tp[b] = l0 < shifted ? shifted : l0;  // torch.maximum (no nan left after the check)
  }
  at::Tensor floor = at::empty({B}, logits.options()), rows = at::empty({B}, long_opts);
  {
    float* fp = floor.data_ptr<float>();
    int64_t* ip = rows.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      fp[b] = -INFINITY;
      ip[b] = b;
    }
  }
  const at::Tensor cum = proposal_weights_cpu(buf, V, logits, floor, top, temperature, block);
  auto drawn = reject_rounds_cpu(hf, weight, bias, logits, classes, V, top, floor, buf.view({B, -1, block}), cum, rows,
                                 keys, temperature, proposals, rounds, false);
  at::Tensor done = std::get<0>(drawn).contiguous();
  bool* dp = done.data_ptr<bool>();
  for (int64_t b = 0; b < B; ++b) dp[b] = dp[b] && !rp[b];
  return {std::get<1>(drawn), std::get<2>(drawn), done};
}

}  // namespace cpu
}  // namespace torchaq
