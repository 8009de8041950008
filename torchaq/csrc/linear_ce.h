// torch.ops.torchaq.linear_ce on CPU (torchaq/csrc/linear_ce.cpp; semantics: torchaq/ops/linear_ce.py).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace torchaq {
namespace cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_ce_cpu(
    const at::Tensor& e, const at::Tensor& c, const std::optional<at::Tensor>& bias, const at::Tensor& targets,
    const std::optional<at::Tensor>& row_grad, int64_t ignore_index, double softcap, double label_smoothing,
    double z_loss, int64_t class_block, int64_t row_chunk);

}  // namespace cpu
}  // namespace torchaq
