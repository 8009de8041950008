// ATen entry points of the CPU PQ encoders (encode.cpp), registered in register.cpp.
#pragma once
#include <ATen/core/Tensor.h>

namespace torchaq {
namespace cpu {

// torchaq::pq_encode: per-subspace nearest codeword, int64 (N, M).
at::Tensor pq_encode_cpu(const at::Tensor& x, const at::Tensor& codebooks);
// torchaq::anisotropic_encode: score-aware coordinate descent (see encode_generic.h), int64 (N, M).
at::Tensor anisotropic_encode_cpu(const at::Tensor& x, const at::Tensor& codebooks, const at::Tensor& eta,
                                  int64_t max_rounds);

}  // namespace cpu
}  // namespace torchaq
