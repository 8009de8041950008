// torchaq::inverse_cdf on CPU: each draw's position from the cumulative block sums (a binary search)
// and one float64 running sum inside its block. The arithmetic is the reference's
// (torchaq/ops/inverse_cdf.py), operation for operation in float64, so the positions are the same:
// searchsorted(right=True) is "the first element greater than the value", the running sum is
// sequential like torch's cumsum along a row. Cost O(P n (log nb + m)), no temporaries.
#include "inverse_cdf.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace torchaq {
namespace cpu {

int64_t inverse_cdf_one(const float* w, const double* c, int64_t nb, int64_t m, double u) {
  const double total = c[nb - 1];
  const double target = u * total;
  const int64_t blk = std::min<int64_t>(std::upper_bound(c, c + nb, target) - c, nb - 1);
  const double start = blk > 0 ? c[blk - 1] : 0.0;
  const float* wb = w + blk * m;
  const double shrink = 1.0 - 1.0 / double(int64_t(1) << 40);
  const double want = std::max(target - start, 0.0);
  // One running sum, stopped at the first j whose sum exceeds `want`. The reference also clamps want
  // to S (1 - 2^-40), S the block's whole sum; S >= run, so where run (1 - 2^-40) > want the clamp
  // cannot change the answer. Otherwise (rounding at the block's very end) the reference's two passes.
  double run = 0.0;
  for (int64_t j = 0; j < m; ++j) {
    run += double(wb[j]);
    if (run > want) {
      if (run * shrink > want) return blk * m + j;
      break;
    }
  }
  double sum = 0.0;
  for (int64_t j = 0; j < m; ++j) sum += double(wb[j]);
  const double rest = std::min(want, sum * shrink);
  run = 0.0;
  for (int64_t j = 0; j < m; ++j) {
    run += double(wb[j]);
    if (run > rest) return blk * m + j;
  }
  return blk * m + m - 1;
}

at::Tensor inverse_cdf_cpu(const at::Tensor& weights_in, const at::Tensor& cum_in, const at::Tensor& rows_in,
                           const at::Tensor& u_in) {
  TORCH_CHECK_TYPE(weights_in.scalar_type() == at::kFloat && weights_in.dim() == 3,
                   "weights must be a float32 (R, nb, m) tensor");
  TORCH_CHECK_TYPE(cum_in.scalar_type() == at::kDouble && cum_in.dim() == 2 && cum_in.size(0) == weights_in.size(0) &&
                       cum_in.size(1) == weights_in.size(1),
                   "cum must be a float64 (R, nb) tensor matching weights");
  TORCH_CHECK_TYPE(rows_in.scalar_type() == at::kLong && rows_in.dim() == 1, "rows must be an int64 (P,) tensor");
  TORCH_CHECK_TYPE(u_in.scalar_type() == at::kDouble && u_in.dim() == 2 && u_in.size(0) == rows_in.size(0),
                   "u must be a float64 (P, n) tensor");
  TORCH_CHECK_VALUE(weights_in.size(1) > 0 && weights_in.size(2) > 0,
                    "weights must have at least one block of one weight");
  const at::Tensor weights = weights_in.contiguous(), cum = cum_in.contiguous(), rows = rows_in.contiguous(),
                   u = u_in.contiguous();
  const int64_t R = weights.size(0), nb = weights.size(1), m = weights.size(2), P = u.size(0), n = u.size(1);
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p)
    TORCH_CHECK_VALUE(rp[p] >= 0 && rp[p] < R, "rows must be in [0, ", R, "), got ", rp[p]);
  at::Tensor out = at::empty({P, n}, u.options().dtype(at::kLong));
  const float* wp = weights.data_ptr<float>();
  const double* cp = cum.data_ptr<double>();
  const double* up = u.data_ptr<double>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, P * n, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = rp[i / n];
      op[i] = inverse_cdf_one(wp + r * nb * m, cp + r * nb, nb, m, up[i]);
    }
  });
  return out;
}

}  // namespace cpu
}  // namespace torchaq
