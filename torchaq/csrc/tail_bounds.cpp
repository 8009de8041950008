// torchaq::tail_bounds_ on CPU: per row, u_i = s_i + a rho_i + c over the scores in place (float32, in that
// order, as the reference), -inf on the head's classes, then the row's maximum. Rows in parallel; a
// row never reads another. Semantics and the pure-torch reference: torchaq/ops/tail_bounds.py.
#include "tail_bounds.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include <cmath>
#include <algorithm>
#include <cstdint>

namespace torchaq {
namespace cpu {
namespace {

// The maximum of x[0, n) as torch's amax: a nan anywhere makes it nan (-inf for n = 0). SSE2 on
// x86-64 (the compiler will not vectorise a float max reduction without -ffast-math).
float row_max(const float* x, int64_t n) {
  int64_t i = 0;
  float m = -INFINITY;
  bool nan = false;
#if defined(__SSE2__)
  __m128 m0 = _mm_set1_ps(-INFINITY), m1 = m0, bad = _mm_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m128 v0 = _mm_loadu_ps(x + i), v1 = _mm_loadu_ps(x + i + 4);
    bad = _mm_or_ps(bad, _mm_or_ps(_mm_cmpunord_ps(v0, v0), _mm_cmpunord_ps(v1, v1)));
    m0 = _mm_max_ps(v0, m0);
    m1 = _mm_max_ps(v1, m1);
  }
  __m128 r = _mm_max_ps(m0, m1);
  r = _mm_max_ps(r, _mm_movehl_ps(r, r));
  r = _mm_max_ss(r, _mm_shuffle_ps(r, r, 1));
  m = _mm_cvtss_f32(r);
  nan = _mm_movemask_ps(bad) != 0;
#endif
  for (; i < n; ++i) {
    m = x[i] > m ? x[i] : m;
    nan |= x[i] != x[i];
  }
  return nan ? NAN : m;
}

}  // namespace

at::Tensor tail_bounds_cpu(at::Tensor& scores, const at::Tensor& error_scales_in, const at::Tensor& h_in,
                           double sigmas, const at::Tensor& step_in, double rounding, const at::Tensor& head_in) {
  TORCH_CHECK_VALUE(scores.dim() == 2 && scores.scalar_type() == at::kFloat && (scores.size(1) <= 1 || scores.stride(1) == 1),
                    "scores must be a float32 (B, N) tensor with contiguous columns");
  const int64_t B = scores.size(0), N = scores.size(1);
  TORCH_CHECK_VALUE(error_scales_in.dim() == 1 && error_scales_in.size(0) == N && error_scales_in.is_floating_point(),
                    "error_scales must be a floating-point (", N, ",) tensor");
  TORCH_CHECK_VALUE(h_in.dim() == 2 && h_in.size(0) == B && h_in.is_floating_point(),
                    "h must be a floating-point (", B, ", d) tensor");
  TORCH_CHECK_VALUE(step_in.dim() == 1 && step_in.size(0) == B && step_in.scalar_type() == at::kFloat,
                    "step must be a float32 (", B, ",) tensor");
  TORCH_CHECK_VALUE(head_in.dim() == 2 && head_in.size(0) == B && head_in.scalar_type() == at::kLong,
                    "head must be an int64 (", B, ", H) tensor");
  TORCH_CHECK_VALUE(sigmas >= 0 && rounding >= 0, "sigmas and rounding must be >= 0");
  at::Tensor upper_max = at::empty({B}, scores.options());
  if (B == 0) return upper_max;
  const at::Tensor rho = error_scales_in.to(at::kFloat).contiguous(), h = h_in.to(at::kFloat).contiguous(),
                   step = step_in.contiguous(), head = head_in.contiguous();
  const int64_t d = h.size(1), H = head.size(1), rs = scores.stride(0);
  const int64_t* hp = head.const_data_ptr<int64_t>();
  for (int64_t i = 0, n = head.numel(); i < n; ++i)
    TORCH_CHECK_VALUE(hp[i] >= 0 && hp[i] < N, "head must hold class ids in [0, N=", N, ")");
  const float* rp = rho.const_data_ptr<float>();
  const float* xp = h.const_data_ptr<float>();
  const float* sp = step.const_data_ptr<float>();
  float* out = scores.data_ptr<float>();
  float* mp = upper_max.data_ptr<float>();
  const float sig = float(sigmas), rnd = float(rounding);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double sq = 0;
      for (int64_t j = 0; j < d; ++j) sq += double(xp[b * d + j]) * double(xp[b * d + j]);
      const float a = float(std::sqrt(sq)) * sig, c = rnd * sp[b];
      float* u = out + b * rs;
      for (int64_t i = 0; i < N; ++i) u[i] = (u[i] + a * rp[i]) + c;  // vectorised; no FMA (baseline flags)
      for (int64_t j = 0; j < H; ++j) u[hp[b * H + j]] = -INFINITY;
      mp[b] = row_max(u, N);
    }
  });
  return upper_max;
}

}  // namespace cpu
}  // namespace torchaq
