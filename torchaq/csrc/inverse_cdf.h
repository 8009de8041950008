// ATen entry point of torchaq::inverse_cdf (inverse_cdf.cpp), registered in register.cpp.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace torchaq {
namespace cpu {

// (P, n) int64 inverse-CDF positions of u (P, n) on rows (P,) of block weights (R, nb, m) whose
// cumulative block sums are cum (R, nb); semantics: torchaq/ops/inverse_cdf.py.
// One draw: the position of uniform u in the m-weight blocks w (nb blocks) with cumulative block
// sums c (nb), in the reference's float64 arithmetic.
int64_t inverse_cdf_one(const float* w, const double* c, int64_t nb, int64_t m, double u);

at::Tensor inverse_cdf_cpu(const at::Tensor& weights, const at::Tensor& cum, const at::Tensor& rows,
                           const at::Tensor& u);

}  // namespace cpu
}  // namespace torchaq
