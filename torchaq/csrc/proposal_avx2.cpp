// AVX2 + FMA kernel of torchaq::proposal_weights_ (proposal.cpp): one row's exponents, exp and block sums
// in one pass. Compiled with the AVX2 flags of setup.py; called only when the CPU reports them.
//
// The same float operations in the same order as proposal.cpp's three passes (exponents(), the
// cross-entropy tile's exp8 through lce_grad_avx2, block_sum()), so the weights and sums are the
// same bits; the row is read and written once instead of three times.
#include <immintrin.h>

#include <cmath>

#include "exp_avx2.h"
#include "proposal_kernels.h"

namespace torchaq {
namespace cpu {

void proposal_row_avx2(float* w, int64_t W, float top, float t, float floor, int64_t block, double* cum) {
  const __m256 vtop = _mm256_set1_ps(top), vt = _mm256_set1_ps(t), vfloor = _mm256_set1_ps(floor);
  const __m256 ninf = _mm256_set1_ps(-INFINITY);
  const bool divide = t != 1.0f;
  double run = 0.0;
  for (int64_t k = 0; k < W / block; ++k) {
    float* b = w + k * block;
    __m256 acc = _mm256_setzero_ps();  // lane l sums entries l, l + 8, ... as block_sum's acc[l]
    for (int64_t j = 0; j < block; j += 8) {
      const __m256 x = _mm256_loadu_ps(b + j);
      __m256 v = _mm256_sub_ps(x, vtop);
      if (divide) v = _mm256_div_ps(v, vt);
      v = _mm256_blendv_ps(v, ninf, _mm256_cmp_ps(x, vfloor, _CMP_LT_OQ));
      const __m256 e = exp8(v);
      _mm256_storeu_ps(b + j, e);
      acc = _mm256_add_ps(acc, e);
    }
    alignas(32) float a[8];
    _mm256_store_ps(a, acc);
    cum[k] = run += double(((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])));
  }
}

}  // namespace cpu
}  // namespace torchaq
