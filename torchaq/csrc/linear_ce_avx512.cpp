// AVX-512 element-wise tile kernels of the fused linear cross-entropy (contract: linear_ce_kernels.h).
// Compiled with the AVX-512 flags of setup.py; called only when the CPU reports them.
#include <immintrin.h>

#include <cmath>

#include "linear_ce_kernels.h"

namespace torchaq {
namespace cpu {
namespace {

inline __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.33654f);
  const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, lo), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(y, n));
}

inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1); }

}  // namespace

void lce_stats_avx512(const float* tile, int64_t n, int64_t w, float* mx, float* se, float* ls) {
  for (int64_t i = 0; i < n; ++i) {
    const float* row = tile + i * w;
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < w; j += 16) m = _mm512_max_ps(m, _mm512_mask_loadu_ps(m, tail_mask(w - j), row + j));
    const float rmax = _mm512_reduce_max_ps(m);
    const __m512 vm = _mm512_set1_ps(rmax);
    __m512 s = _mm512_setzero_ps(), t = _mm512_setzero_ps();
    for (int64_t j = 0; j < w; j += 16) {
      const __mmask16 k = tail_mask(w - j);
      const __m512 v = _mm512_maskz_loadu_ps(k, row + j);
      s = _mm512_add_ps(s, _mm512_maskz_mov_ps(k, exp16(_mm512_sub_ps(v, vm))));
      t = _mm512_add_ps(t, v);
    }
    mx[i] = rmax;
    se[i] = _mm512_reduce_add_ps(s);
    if (ls != nullptr) ls[i] = _mm512_reduce_add_ps(t);
  }
}

void lce_grad_avx512(float* tile, int64_t n, int64_t w, const float* lse, const float* a, const float* s, float cap) {
  const __m512 inv = _mm512_set1_ps(cap > 0 ? 1.0f / cap : 0.0f), one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; ++i) {
    float* row = tile + i * w;
    const __m512 vl = _mm512_set1_ps(lse[i]), va = _mm512_set1_ps(a[i]), vs = _mm512_set1_ps(s ? s[i] : 0.0f);
    for (int64_t j = 0; j < w; j += 16) {
      const __mmask16 k = tail_mask(w - j);
      const __m512 v = _mm512_maskz_loadu_ps(k, row + j);
      __m512 g = _mm512_sub_ps(_mm512_mul_ps(va, exp16(_mm512_sub_ps(v, vl))), vs);
      if (cap > 0) {
        const __m512 q = _mm512_mul_ps(v, inv);
        g = _mm512_mul_ps(g, _mm512_fnmadd_ps(q, q, one));
      }
      _mm512_mask_storeu_ps(row + j, k, g);
    }
  }
}

}  // namespace cpu
}  // namespace torchaq
