// ATen entry point of torchaq::tail_bounds_ (tail_bounds.cpp), registered in register.cpp.
#pragma once
#include <ATen/core/Tensor.h>

namespace torchaq {
namespace cpu {

// The sampler's upper bounds of the tail logits written over the LUT scores, -inf on the head;
// returns each row's largest bound. Semantics: torchaq/ops/tail_bounds.py.
at::Tensor tail_bounds_cpu(at::Tensor& scores, const at::Tensor& error_scales, const at::Tensor& h, double sigmas,
                           const at::Tensor& step, double rounding, const at::Tensor& head);

}  // namespace cpu
}  // namespace torchaq
