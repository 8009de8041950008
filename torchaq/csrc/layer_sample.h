// ATen entry point of torchaq::layer_sample (layer_sample.cpp), registered in register.cpp.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace torchaq {
namespace cpu {

// The untruncated full-vocabulary sampler of a PQ layer in one call; semantics: torchaq/ops/layer_sample.py.
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_sample_cpu(
    const at::Tensor& h, const at::Tensor& queries, const at::Tensor& codebooks, const at::Tensor& packed,
    int64_t num_classes, const std::optional<at::Tensor>& scan_bias, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& side_rows, const at::Tensor& error_scales,
    const at::Tensor& seeds, int64_t head, double sigmas, double rounding, double temperature, double weight_range,
    int64_t block, int64_t proposals, int64_t rounds);

}  // namespace cpu
}  // namespace torchaq
