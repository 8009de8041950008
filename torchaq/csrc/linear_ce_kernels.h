// Plain-data interface between the fused linear cross-entropy driver (linear_ce.cpp) and its
// per-ISA element-wise tile kernels (linear_ce.cpp: portable; linear_ce_avx2.cpp,
// linear_ce_avx512.cpp). Raw pointers only (see scan_kernels.h). Tiles are row-major (n, w) float32.
//
// stats: for each row i, mx[i] = max_j l_ij, se[i] = sum_j exp(l_ij - mx[i]) and, when ls is not
//        null, ls[i] = sum_j l_ij.
// grad:  l_ij <- a[i] exp(l_ij - lse[i]) - (s ? s[i] : 0), times (1 - (l_ij / cap)^2) when cap > 0
//        (the softcap's derivative, from the capped logit read before the update).
// The vector exp is Cephes' expf (a degree-5 polynomial after range reduction, ~1 ulp); inputs
// below -87.3 give 0 (exp would be a float32 denormal, under 1.2e-38).
#pragma once
#include <cstdint>

namespace torchaq {
namespace cpu {

#define TORCHAQ_DECLARE_LCE(isa)                                                                              \
  void lce_stats_##isa(const float* tile, int64_t n, int64_t w, float* mx, float* se, float* ls);             \
  void lce_grad_##isa(float* tile, int64_t n, int64_t w, const float* lse, const float* a, const float* s, \
                      float cap);

TORCHAQ_DECLARE_LCE(scalar)
TORCHAQ_DECLARE_LCE(avx2)
TORCHAQ_DECLARE_LCE(avx512)
#undef TORCHAQ_DECLARE_LCE

using LceStatsFn = void (*)(const float*, int64_t, int64_t, float*, float*, float*);
// The stats kernel of the active ISA (the one linear_ce uses; defined in linear_ce.cpp).
LceStatsFn lce_stats_kernel();
using LceGradFn = void (*)(float*, int64_t, int64_t, const float*, const float*, const float*, float);
// The grad kernel of the active ISA (with a = 1, s = null, cap = 0 it is an element-wise exp(x - lse)).
LceGradFn lce_grad_kernel();

}  // namespace cpu
}  // namespace torchaq
