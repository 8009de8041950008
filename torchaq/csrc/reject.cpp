// torchaq::reject_rounds on CPU: the rejection rounds of the full-vocabulary sampler, draw by draw.
// Semantics and the pure-torch reference: torchaq/ops/reject.py. Each draw walks its rounds'
// proposals in order: the counter-based uniforms of torchaq/ops/counter_rng.py (the same 32-bit
// hash, so the same numbers), the position from inverse_cdf_one (the same float64 arithmetic as
// torchaq::inverse_cdf), one dot product of the re-score kernel per tail proposal. Every proposal of
// a round is evaluated, as in the reference, so the violation counts agree too. Draws run in parallel
// (at::parallel_for); nothing a draw computes depends on another draw.
#include "reject.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

#include "counter_rng.h"
#include "inverse_cdf.h"
#include "rescore_kernels.h"

namespace torchaq {
namespace cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> reject_rounds_cpu(
    const at::Tensor& h_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in,
    const at::Tensor& logits_in, const at::Tensor& classes_in, int64_t num_tail, const at::Tensor& top_in,
    const at::Tensor& floor_in, const at::Tensor& weights_in, const at::Tensor& cum_in, const at::Tensor& rows_in,
    const at::Tensor& keys_in, double temperature, int64_t proposals, int64_t rounds, bool lut_tail) {
  TORCH_CHECK_VALUE(h_in.dim() == 2 && h_in.scalar_type() == at::kFloat, "h must be a float32 (R, d) tensor");
  const int64_t R = h_in.size(0), d = h_in.size(1);
  TORCH_CHECK_VALUE(weight_in.dim() == 2 && weight_in.size(1) == d, "weight must be (V, ", d, ")");
  TORCH_CHECK_VALUE(logits_in.dim() == 2 && logits_in.size(0) == R && logits_in.size(1) > 0 &&
                        logits_in.scalar_type() == at::kFloat,
                    "logits must be a float32 (R, H) tensor with H >= 1");
  TORCH_CHECK_VALUE(classes_in.sizes() == logits_in.sizes() && classes_in.scalar_type() == at::kLong,
                    "classes must be an int64 tensor shaped like logits");
  TORCH_CHECK_VALUE(num_tail >= 0 && num_tail <= weight_in.size(0), "num_tail must be in [0, V=", weight_in.size(0),
                    "], got ", num_tail);
  TORCH_CHECK_VALUE(top_in.dim() == 1 && top_in.size(0) == R && top_in.scalar_type() == at::kFloat,
                    "top must be a float32 (R,) tensor");
  TORCH_CHECK_VALUE(floor_in.dim() == 1 && floor_in.size(0) == R && floor_in.scalar_type() == at::kFloat,
                    "floor must be a float32 (R,) tensor");
  TORCH_CHECK_VALUE(weights_in.dim() == 3 && weights_in.size(0) == R && weights_in.scalar_type() == at::kFloat,
                    "weights must be a float32 (R, nb, m) tensor");
  const int64_t H = logits_in.size(1), N = num_tail, nb = weights_in.size(1), m = weights_in.size(2);
  const int64_t span = N + (m - N % m) % m;
  TORCH_CHECK_VALUE(nb * m >= span + H, "weights must hold the tail and the head");
  TORCH_CHECK_VALUE(cum_in.dim() == 2 && cum_in.size(0) == R && cum_in.size(1) == nb &&
                        cum_in.scalar_type() == at::kDouble,
                    "cum must be a float64 (R, nb) tensor");
  TORCH_CHECK_VALUE(rows_in.dim() == 1 && rows_in.scalar_type() == at::kLong, "rows must be an int64 (P,) tensor");
  TORCH_CHECK_VALUE(keys_in.sizes() == rows_in.sizes() && keys_in.scalar_type() == at::kLong,
                    "keys must be an int64 tensor shaped like rows");
  TORCH_CHECK_VALUE(temperature > 0, "temperature must be > 0");
  TORCH_CHECK_VALUE(proposals >= 1 && rounds >= 0 && rounds <= 30, "proposals must be >= 1 and rounds in [0, 30]");
  TORCH_CHECK_VALUE(weight_in.size(0) < (int64_t(1) << 31), "weight must have < 2^31 rows");

  const at::Tensor h = h_in.contiguous(), logits = logits_in.contiguous(), classes = classes_in.contiguous(),
                   top = top_in.contiguous(), floor = floor_in.contiguous(), weights = weights_in.contiguous(),
                   cum = cum_in.contiguous(), rows = rows_in.contiguous(), keys = keys_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const bool f32 = weight.scalar_type() == at::kFloat;
  const at::Tensor bias = bias_in ? bias_in->to(at::kFloat).contiguous() : at::Tensor();
  const int64_t P = rows.size(0);
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p) TORCH_CHECK_VALUE(rp[p] >= 0 && rp[p] < R, "rows must be in [0, ", R, ")");

  auto opt = rows.options();
  at::Tensor done = at::zeros({P}, opt.dtype(at::kBool)), tokens = at::zeros({P}, opt),
             values = at::zeros({P}, opt.dtype(at::kFloat)), violations = at::zeros({P}, opt);
  bool* dp = done.data_ptr<bool>();
  int64_t* tp = tokens.data_ptr<int64_t>();
  float* vp = values.data_ptr<float>();
  int64_t* xp = violations.data_ptr<int64_t>();
  const float* hp = h.data_ptr<float>();
  const float* lp = logits.data_ptr<float>();
  const int64_t* cp = classes.data_ptr<int64_t>();
  const float* topp = top.data_ptr<float>();
  const float* fp = floor.data_ptr<float>();
  const float* wp = weights.data_ptr<float>();
  const double* sp = cum.data_ptr<double>();
  const int64_t* kp = keys.data_ptr<int64_t>();
  const float* bp = bias_in ? bias.data_ptr<float>() : nullptr;
  const float* Wp = f32 ? weight.data_ptr<float>() : nullptr;
  const float t = float(temperature);
  const DotsFn dots = dots_kernel();

  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> row(f32 ? 0 : d);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t r = rp[p];
      const uint32_t key = uint32_t(uint64_t(kp[p]));
      const float* hr = hp + r * d;
      int64_t viol = 0;
      for (int64_t rnd = 0; rnd < rounds && !dp[p]; ++rnd) {
        const int64_t n = proposals << rnd;
        for (int64_t j = 0; j < n; ++j) {
          const int64_t pos = inverse_cdf_one(wp + r * nb * m, sp + r * nb, nb, m, key_uniform(key, 2 * rnd + 1, j));
          int64_t cls;
          float exact;
          bool accept;
          if (pos >= span) {  // a head class: its exact logit is known, always kept
            const int64_t hpos = std::min(pos - span, H - 1);
            cls = cp[r * H + hpos];
            exact = lp[r * H + hpos];
            accept = true;
          } else {
            cls = std::min(pos, N - 1);
            const int32_t id = int32_t(cls);
            if (f32) {
              dots(hr, Wp, d, d, &id, 1, &exact);
            } else {  // bf16 / fp16 / fp64 weights: this row in float32
              at::from_blob(row.data(), {d}, at::TensorOptions().dtype(at::kFloat)).copy_(weight[cls]);
              const int32_t zero = 0;
              dots(hr, row.data(), d, d, &zero, 1, &exact);
            }
            if (bp != nullptr) exact += bp[cls];
            // the bound, read back from the weight that overwrote it: (l - u) / T = (l - top) / T - log w
            const float w = wp[r * nb * m + pos];
            const double excess = double((exact - topp[r]) / t) - std::log(double(w));
            viol += w > 0 && excess > 0;
            accept = w > 0 && exact >= fp[r] && (lut_tail || std::log(key_uniform(key, 2 * rnd + 2, j)) < excess);
          }
          if (accept && !dp[p]) {
            dp[p] = true;
            tp[p] = cls;
            vp[p] = exact;
          }
        }
      }
      xp[p] = viol;
    }
  });
  return {done, tokens, values, violations};
}

}  // namespace cpu
}  // namespace torchaq
