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

// Optional shortlist stage of rescore_topk_side_cpu: each row's distinct candidates are first
// ranked by <h, scale[c] * rows8[c]> (+ bias) from an int8 copy of the weight, and only the best
// `keep` (at least k) re-scored exactly. Off when rows8 is null.
struct Shortlist {
  const int8_t* rows8 = nullptr;  // (V, d) int8, row-major
  const float* scale = nullptr;   // (V,)
  int64_t keep = 0;
};

// rescore_topk_cpu over the candidates of each row followed by the (S,) ids side_rows, the same for
// every row (as if appended to each row of candidates; the layer's exact side list).
std::tuple<at::Tensor, at::Tensor> rescore_topk_side_cpu(const at::Tensor& h, const at::Tensor& weight,
                                                         const std::optional<at::Tensor>& bias,
                                                         const at::Tensor& candidates,
                                                         const std::optional<at::Tensor>& side_rows, int64_t k,
                                                         const Shortlist& shortlist);

// torch.ops.torchaq.layer_topk on CPU (layer_topk.cpp).
std::tuple<at::Tensor, at::Tensor> layer_topk_cpu(const at::Tensor& h, const at::Tensor& queries,
                                                  const at::Tensor& codebooks, const at::Tensor& packed,
                                                  int64_t num_classes, int64_t candidates,
                                                  const std::optional<at::Tensor>& scan_bias,
                                                  const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                                  const at::Tensor& side_rows,
                                                  const std::optional<at::Tensor>& weight_i8,
                                                  const std::optional<at::Tensor>& row_scale, int64_t shortlist,
                                                  int64_t k);

}  // namespace cpu
}  // namespace torchaq
