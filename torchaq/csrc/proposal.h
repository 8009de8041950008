// ATen entry point of torchaq::proposal_weights (proposal.cpp), registered in register.cpp.
#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>

namespace torchaq {
namespace cpu {

// The sampler's proposal exp((x - top) / T) as zero-padded block weights and their cumulative block
// sums; semantics: torchaq/ops/proposal.py.
std::tuple<at::Tensor, at::Tensor> proposal_weights_cpu(const at::Tensor& upper, const at::Tensor& logits,
                                                        const at::Tensor& floor, const at::Tensor& top,
                                                        double temperature, int64_t block);

}  // namespace cpu
}  // namespace torchaq
