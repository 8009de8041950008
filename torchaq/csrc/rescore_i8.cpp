// Portable int8 shortlist dot products (baseline flags), exact integer sums (rescore_i8_kernels.h);
// the AVX-512 twin is rescore_i8_avx512.cpp. The AVX2 kernel set uses this one.
#include "rescore_i8_kernels.h"

namespace torchaq {
namespace cpu {

void dots_i8_scalar(const int16_t* h16, float h_scale, const int8_t* rows8, const float* scale, int64_t d,
                    const int32_t* ids, int64_t n, float* out) {
  for (int64_t c = 0; c < n; ++c) {
    const int8_t* w = rows8 + int64_t(ids[c]) * d;
    int32_t s = 0;
    for (int64_t i = 0; i < d; ++i) s += int32_t(h16[i]) * int32_t(w[i]);
    out[c] = float(s) * (h_scale * scale[ids[c]]);
  }
}

#if !defined(TORCHAQ_X86_KERNELS)
void dots_i8_avx512(const int16_t* h16, float h_scale, const int8_t* rows8, const float* scale, int64_t d,
                    const int32_t* ids, int64_t n, float* out) {
  dots_i8_scalar(h16, h_scale, rows8, scale, d, ids, n, out);
}
#endif

}  // namespace cpu
}  // namespace torchaq
