// Per-query uint8 quantization of a 4-bit LUT (lut_quantize.cpp), shared by the scan drivers.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace torchaq {
namespace cpu {

// lut (B, M, 16) float32 with finite entries (the caller checks) -> qlut (B, 2P, 16) uint8 (rows >= M
// zero), inv_scale (B,) = 1 / scale, offset (B,) = sum_m min_m lut[b, m, :] (summed in double, in
// order m = 0..M-1), coarse (B,) = 1 where the median subspace's trimmed range gets fewer than 4
// uint8 steps (that query must be scored with exact float sums instead). Entry j of subspace m:
//   q = uint8(min(255, trunc((lut - min_m) * float(scale) + 0.5)))   (float32 arithmetic)
//   scale = min(255 / max_m range_m, (65535 - M) / sum_m range_m)   (double; 1 when every range is 0)
// so every class's sum of M entries fits uint16 and differs from the exact score by at most
// M / (2 scale). torchaq.ops.quantized_scan.quantize_lut_reference is the same computation in torch.
void quantize_lut(const at::Tensor& lut, int64_t P, uint8_t* qlut, float* inv_scale, float* offset,
                  uint8_t* coarse);

}  // namespace cpu
}  // namespace torchaq
