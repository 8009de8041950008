// ATen entry point of torchaq::row_topk (row_topk.cpp), registered in register.cpp.
#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>

namespace torchaq {
namespace cpu {

// Each row's k largest entries of a float32 (B, N) matrix, (value desc, index asc), k clamped to N.
std::tuple<at::Tensor, at::Tensor> row_topk_cpu(const at::Tensor& scores, int64_t k);

}  // namespace cpu
}  // namespace torchaq
