// ATen entry points of the CPU scan ops (scan.cpp), registered in register.cpp.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace torchaq {
namespace cpu {

std::tuple<at::Tensor, at::Tensor> lut_topk_cpu(const at::Tensor& lut, const at::Tensor& packed, int64_t num_classes,
                                                int64_t k, const std::optional<at::Tensor>& bias);
// lut_topk_cpu with sorted = false: the same k classes per query, in no particular order (the
// values still match their classes); for callers that re-score the candidates anyway.
std::tuple<at::Tensor, at::Tensor> lut_topk_cpu_impl(const at::Tensor& lut, const at::Tensor& packed,
                                                     int64_t num_classes, int64_t k,
                                                     const std::optional<at::Tensor>& bias, bool sorted);
at::Tensor compute_lut_cpu(const at::Tensor& queries, const at::Tensor& codebooks);
at::Tensor lut_score_cpu(const at::Tensor& lut, const at::Tensor& packed, int64_t num_classes,
                         const std::optional<at::Tensor>& bias);

// Every class's score from the uint8-quantized LUT of 4-bit codes (the arithmetic of lut_topk) and the
// quantization step per query: each score is within M * step / 2 of lut_score's; step 0 where the
// scores are exact (8-bit codes, or a query quantize_lut flags coarse).
std::tuple<at::Tensor, at::Tensor> lut_score_quantized_cpu(const at::Tensor& lut, const at::Tensor& packed,
                                                           int64_t num_classes, const std::optional<at::Tensor>& bias,
                                                           int64_t columns);

// True if x[0, n) holds no inf or nan (exponent bits not all ones), ~n / 16 vector steps.
bool all_finite(const float* x, int64_t n);

// Name of the kernel set the next call will use: "avx512", "avx2" or "scalar".
const char* active_isa();

}  // namespace cpu
}  // namespace torchaq
