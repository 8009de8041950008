// torchaq::mass_histogram on CPU: every exact logit (for_each_logit_tile, logit_tiles.h), its mass
// exp((l - top) / T) by the fused cross-entropy's vectorised exp, added into its bin as an integer
// number of 2^-40 units. Integer sums do not depend on their order, so each thread keeps its own
// histogram and the threads' histograms are added at the end: a row's bins are bitwise the same in
// any batch and at any thread count. Semantics and the reference: torchaq/ops/mass_histogram.py.
#include "mass_histogram.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "linear_ce_kernels.h"
#include "logit_tiles.h"

namespace torchaq {
namespace cpu {

at::Tensor mass_histogram_cpu(const at::Tensor& h_in, const at::Tensor& weight_in,
                              const std::optional<at::Tensor>& bias_in, double temperature, const at::Tensor& top_in,
                              double width, int64_t bins) {
  TORCH_CHECK_TYPE(h_in.dim() == 2 && h_in.is_floating_point(), "h must be a floating-point (B, d) tensor");
  TORCH_CHECK_TYPE(weight_in.dim() == 2 && weight_in.is_floating_point(), "weight must be a floating-point (V, d) tensor");
  TORCH_CHECK_VALUE(weight_in.size(1) == h_in.size(1), "h has d = ", h_in.size(1), " but weight has d = ",
                    weight_in.size(1));
  if (bias_in) {
    TORCH_CHECK_VALUE(bias_in->dim() == 1 && bias_in->size(0) == weight_in.size(0) && bias_in->is_floating_point(),
                      "bias must be a floating-point (", weight_in.size(0), ",) tensor");
  }
  TORCH_CHECK_VALUE(top_in.dim() == 1 && top_in.size(0) == h_in.size(0) && top_in.scalar_type() == at::kFloat,
                    "top must be a float32 (", h_in.size(0), ",) tensor");
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature), "temperature must be a finite number > 0");
  TORCH_CHECK_VALUE(width > 0 && std::isfinite(width), "width must be a finite number > 0, got ", width);
  TORCH_CHECK_VALUE(bins >= 1, "bins must be >= 1, got ", bins);
  TORCH_CHECK_VALUE(weight_in.size(0) < (int64_t(1) << 31), "weight must have < 2^31 rows");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor h = h_in.detach().to(at::kFloat).contiguous();
  TORCH_CHECK_VALUE(h.numel() == 0 || at::isfinite(h).all().item<bool>(), "mass_histogram: h must be finite");
  const at::Tensor top = top_in.contiguous();
  TORCH_CHECK_VALUE(top.numel() == 0 || at::isfinite(top).all().item<bool>(), "mass_histogram: top must be finite");
  const at::Tensor weight = weight_in.detach().contiguous();
  const at::Tensor bias = bias_in ? bias_in->detach().to(at::kFloat).contiguous() : at::Tensor();
  const int64_t B = h.size(0), d = h.size(1);
  const int64_t tw = tile_width(d), threads = at::get_num_threads();
  std::vector<int64_t> counts(size_t(threads) * B * bins, 0);
  const float* tp = top.data_ptr<float>();
  const float temp = float(temperature);
  const double inv_width = 1.0 / width;
  const auto exp_kernel = lce_grad_kernel();  // with a = 1, lse = 0, s = null: exp(x) element-wise
  if (B > 0) {
    for_each_logit_tile(h, weight, bias_in ? bias.data_ptr<float>() : nullptr,
                        [&](int64_t, int64_t, int64_t w, float* logits) {
                          int64_t* mine = counts.data() + size_t(at::get_thread_num()) * B * bins;
                          std::vector<float> x(w);
                          std::vector<int64_t> bin(w);
                          const float zero = 0.0f, one = 1.0f;
                          for (int64_t b = 0; b < B; ++b) {
                            const float* l = logits + b * tw;
                            for (int64_t j = 0; j < w; ++j) {
                              x[j] = (l[j] - tp[b]) / temp;
                              // floor(-x / width) clamped to [0, bins - 1], branch-free (vectorised)
                              const double k = std::floor(-double(x[j]) * inv_width);
                              bin[j] = int64_t(std::fmin(std::fmax(k, 0.0), double(bins - 1)));
                            }
                            exp_kernel(x.data(), 1, w, &zero, &one, nullptr, 0.0f);
                            int64_t* row = mine + b * bins;
                            // masses above top (a bound that failed) are capped at 2^4: no int64 overflow;
                            // round half up (masses are >= 0)
                            for (int64_t j = 0; j < w; ++j)
                              row[bin[j]] += int64_t(double(std::fmin(x[j], 16.0f)) * 1099511627776.0 + 0.5);
                          }
                        });
  }
  at::Tensor out = at::zeros({B, bins}, h.options().dtype(at::kDouble));
  double* op = out.data_ptr<double>();
  for (int64_t i = 0; i < B * bins; ++i) {
    int64_t total = 0;
    for (int64_t t = 0; t < threads; ++t) total += counts[size_t(t) * B * bins + i];
    op[i] = double(total) / 1099511627776.0;
  }
  return out;
}

}  // namespace cpu
}  // namespace torchaq
