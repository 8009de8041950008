// ATen entry point of the CPU normal-equations product of the joint codebook update
// (normal_apply.cpp), registered in register.cpp.
#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>

namespace torchaq {
namespace cpu {

// torchaq::anisotropic_normal_apply: (M, K, dsub) float32 (see torchaq/ops/normal_apply.py).
at::Tensor normal_apply_cpu(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& coef,
                            const at::Tensor& codebooks);
// torchaq::anisotropic_normal_rhs: (b, diag A), two (M, K, dsub) float32 (see torchaq/ops/normal_apply.py).
std::tuple<at::Tensor, at::Tensor> normal_rhs_cpu(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& eta,
                                                  const at::Tensor& coef, int64_t num_codewords);

}  // namespace cpu
}  // namespace torchaq
