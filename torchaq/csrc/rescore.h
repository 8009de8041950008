// ATen entry point of the fused exact re-score + top-k (rescore.cpp), registered in register.cpp.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace torchaq {
namespace cpu {

std::tuple<at::Tensor, at::Tensor> rescore_topk_cpu(const at::Tensor& h, const at::Tensor& weight,
                                                    const std::optional<at::Tensor>& bias,
                                                    const at::Tensor& candidates, int64_t k);

}  // namespace cpu
}  // namespace torchaq
