// ATen entry point of torchaq::reject_rounds (reject.cpp), registered in register.cpp.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace torchaq {
namespace cpu {

// The full-vocabulary sampler's rejection rounds; semantics: torchaq/ops/reject.py.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> reject_rounds_cpu(
    const at::Tensor& h, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& logits,
    const at::Tensor& classes, int64_t num_tail, const at::Tensor& top, const at::Tensor& floor,
    const at::Tensor& weights, const at::Tensor& cum, const at::Tensor& rows, const at::Tensor& keys,
    double temperature, int64_t proposals, int64_t rounds, bool lut_tail);

}  // namespace cpu
}  // namespace torchaq
