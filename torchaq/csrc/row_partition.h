// ATen entry point of torchaq::row_log_partition (row_partition.cpp), registered in register.cpp.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

namespace torchaq {
namespace cpu {

// (B, 2) float32: [logsumexp(l / T) over all classes, the same over l >= floor], l = h W^T + b;
// each row bitwise the same in any batch and at any thread count.
at::Tensor row_log_partition_cpu(const at::Tensor& h, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 double temperature, const std::optional<at::Tensor>& floor);

}  // namespace cpu
}  // namespace torchaq
