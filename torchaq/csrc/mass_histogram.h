// ATen entry point of torchaq::mass_histogram (mass_histogram.cpp), registered in register.cpp.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

namespace torchaq {
namespace cpu {

// (B, bins) float64: each row's softmax mass exp((l - top) / T) summed into bins of (top - l) / T of
// the given width; semantics: torchaq/ops/mass_histogram.py.
at::Tensor mass_histogram_cpu(const at::Tensor& h, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              double temperature, const at::Tensor& top, double width, int64_t bins);

}  // namespace cpu
}  // namespace torchaq
