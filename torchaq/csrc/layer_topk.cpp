// CPU kernel of torch.ops.torchaq.layer_topk (schema, reference and contract: torchaq/ops/layer_topk.py):
// the whole top-k path of QuantizedSoftmax.topk in one call -- LUT, 4/8-bit scan for the best
// `candidates` coded rows, exact re-score of those plus the side list, top-k -- so that a batch-1
// call pays one dispatch and no intermediate tensors beyond the LUT and the candidate ids.
//
// It composes the ops' own CPU kernels (compute_lut_cpu, lut_topk_cpu_impl, rescore_topk_side_cpu)
// and differs from calling them in turn only in what the result cannot show: the scan's candidates
// are selected but not sorted (the re-score does not need their order), and the side rows are
// read by the re-score in place instead of being appended to every row of candidates.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "rescore.h"
#include "scan.h"

namespace torchaq {
namespace cpu {

std::tuple<at::Tensor, at::Tensor> layer_topk_cpu(const at::Tensor& h, const at::Tensor& queries,
                                                  const at::Tensor& codebooks, const at::Tensor& packed,
                                                  int64_t num_classes, int64_t candidates,
                                                  const std::optional<at::Tensor>& scan_bias,
                                                  const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                                  const at::Tensor& side_rows,
                                                  const std::optional<at::Tensor>& weight_i8,
                                                  const std::optional<at::Tensor>& row_scale, int64_t shortlist,
                                                  int64_t k) {
  // the checks torchaq/ops/layer_topk.py makes and the composed kernels do not
  TORCH_CHECK_VALUE(h.dim() == 2 && queries.dim() == 2 && queries.size(0) == h.size(0),
                    "h must be (B, d) and queries (B, M * dsub) with the same B, got shapes ", h.sizes(), " and ",
                    queries.sizes());
  TORCH_CHECK_VALUE(candidates >= 1, "candidates must be >= 1, got ", candidates);
  TORCH_CHECK_VALUE(k >= 1, "k must be >= 1, got ", k);
  TORCH_CHECK_TYPE(queries.scalar_type() == at::kFloat, "queries must be float32, got ", queries.scalar_type());
  TORCH_CHECK_VALUE(weight_i8.has_value() == row_scale.has_value(), "weight_i8 and row_scale go together");
  Shortlist sl;
  at::Tensor w8, sc;
  if (weight_i8.has_value()) {
    TORCH_CHECK_TYPE(weight_i8->scalar_type() == at::kChar && row_scale->scalar_type() == at::kFloat,
                     "weight_i8 must be int8 and row_scale float32, got ", weight_i8->scalar_type(), " and ",
                     row_scale->scalar_type());
    TORCH_CHECK_VALUE(weight_i8->sizes() == weight.sizes() && row_scale->dim() == 1 &&
                          row_scale->size(0) == weight.size(0),
                      "weight_i8 must have the shape of weight ", weight.sizes(), " and row_scale (V,), got ",
                      weight_i8->sizes(), " and ", row_scale->sizes());
    TORCH_CHECK_VALUE(weight_i8->device() == h.device() && row_scale->device() == h.device(),
                      "weight_i8 and row_scale must be on the device of h");
    TORCH_CHECK_VALUE(shortlist >= 1, "shortlist must be >= 1, got ", shortlist);
    w8 = weight_i8->contiguous();
    sc = row_scale->contiguous();
    sl = Shortlist{w8.const_data_ptr<int8_t>(), sc.const_data_ptr<float>(), shortlist};
  }
  const at::Tensor q = queries.contiguous();
  // a non-finite h would otherwise surface as a non-finite LUT (or, where a query's zero-padded
  // subspaces hide it, as nan logits)
  TORCH_CHECK_VALUE(all_finite(q.const_data_ptr<float>(), q.numel()), "h contains NaN or Inf");
  const at::Tensor lut = compute_lut_cpu(q, codebooks);
  const int64_t scan_k = std::min(candidates, num_classes);
  auto scanned = lut_topk_cpu_impl(lut, packed, num_classes, scan_k, scan_bias, /*sorted=*/false);
  return rescore_topk_side_cpu(h, weight, bias, std::get<1>(scanned), side_rows, k, sl);
}

}  // namespace cpu
}  // namespace torchaq
