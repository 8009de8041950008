// Plain-data interface between the exact re-score driver (rescore.cpp) and its per-ISA dot-product
// kernels (rescore.cpp: portable, rescore_avx2.cpp, rescore_avx512.cpp). Raw pointers only, for the
// reason given in scan_kernels.h (the ISA files must not instantiate shared inline functions).
//
// Every kernel returns bit-identical floats: a dot product <h, w> of length d is summed as 64
// partial sums p[r] = sum_i h[64 i + r] * w[64 i + r] (i ascending, each product rounded, then
// added: no fused multiply-add), missing tail elements counting as +0; then
//   s[r] = (p[r] + p[r + 16]) + (p[r + 32] + p[r + 48]),  r < 16,
// and s is halved pairwise: s[r] += s[r + 8], then + 4, + 2, + 1; the dot product is s[0].
#pragma once
#include <cstdint>

namespace torchaq {
namespace cpu {

// out[i] = <h, rows + ids[i] * ld> (length d) for i < n. The kernels prefetch the next rows.
#define TORCHAQ_DECLARE_DOTS(isa) \
  void dots_##isa(const float* h, const float* rows, int64_t ld, int64_t d, const int32_t* ids, int64_t n, float* out);

TORCHAQ_DECLARE_DOTS(scalar)
TORCHAQ_DECLARE_DOTS(avx2)
TORCHAQ_DECLARE_DOTS(avx512)
#undef TORCHAQ_DECLARE_DOTS

using DotsFn = void (*)(const float*, const float*, int64_t, int64_t, const int32_t*, int64_t, float*);
// The dots kernel of the active ISA (scan.h's active_isa(): honours TORCHAQ_FORCE_SCALAR / TORCHAQ_CPU_ISA).
DotsFn dots_kernel();

}  // namespace cpu
}  // namespace torchaq
