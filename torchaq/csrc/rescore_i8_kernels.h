// Approximate dot products against an int8 copy of the weight rows: the shortlist stage of
// layer_topk (rescore.cpp). Raw pointers only (see scan_kernels.h). The query is given as integers
// h16 (h ~ h_scale * h16, rounded by the caller with |h16| <= min(32767, (2^31 - 1) / (127 d))), so
// every kernel computes the same exact int32 sum_i h16[i] * w8[i] (|w8| <= 127), and returns
// float(that sum) * (h_scale * scale[row]): bit-identical on every kernel set.
#pragma once
#include <cstdint>

namespace torchaq {
namespace cpu {

// out[i] = float(<h16, rows8[ids[i]]>) * (h_scale * scale[ids[i]]) for i < n (rows of length d).
#define TORCHAQ_DECLARE_DOTS_I8(isa)                                                                           \
  void dots_i8_##isa(const int16_t* h16, float h_scale, const int8_t* rows8, const float* scale, int64_t d, \
                     const int32_t* ids, int64_t n, float* out);

TORCHAQ_DECLARE_DOTS_I8(scalar)
TORCHAQ_DECLARE_DOTS_I8(avx512)
#undef TORCHAQ_DECLARE_DOTS_I8

}  // namespace cpu
}  // namespace torchaq
