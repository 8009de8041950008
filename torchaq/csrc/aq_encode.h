// ATen entry point of the CPU additive-quantization encoder (aq_encode.cpp), registered in register.cpp.
#pragma once
#include <ATen/core/Tensor.h>

namespace torchaq {
namespace cpu {

at::Tensor aq_encode_cpu(const at::Tensor& x, const at::Tensor& codebooks, const at::Tensor& codes,
                         const at::Tensor& eta, const at::Tensor& perturb, int64_t icm_iters, bool greedy);

}  // namespace cpu
}  // namespace torchaq
