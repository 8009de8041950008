// ATen entry point of the CPU normal-equations product of the joint codebook update
// (normal_apply.cpp), registered in register.cpp.
#pragma once
#include <ATen/core/Tensor.h>

namespace torchaq {
namespace cpu {

// torchaq::anisotropic_normal_apply: (M, K, dsub) float32 (see torchaq/normal_apply.py).
at::Tensor normal_apply_cpu(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& coef,
                            const at::Tensor& codebooks);

}  // namespace cpu
}  // namespace torchaq
