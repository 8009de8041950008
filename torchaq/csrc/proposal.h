// ATen entry point of torchaq::proposal_weights_ (proposal.cpp), registered in register.cpp.
#pragma once
#include <ATen/core/Tensor.h>

namespace torchaq {
namespace cpu {

// The sampler's proposal exp((x - top) / T) as zero-padded block weights written over the bounds in
// weights, and their cumulative block sums; semantics: torchaq/ops/proposal.py.
at::Tensor proposal_weights_cpu(at::Tensor& weights, int64_t num_tail, const at::Tensor& logits,
                                const at::Tensor& floor, const at::Tensor& top, double temperature, int64_t block);

}  // namespace cpu
}  // namespace torchaq
