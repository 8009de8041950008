// torchaq::proposal_weights_ on CPU: per row, one pass writes (x - top) / T over the bounds (-inf below
// the floor and in the padding), one call of the fused cross-entropy's vectorised exp turns the row into weights
// (exp(-inf) = 0), then the block sums (eight float32 partial sums per block) and their float64
// running sum; on AVX2 the three passes are one (proposal_avx2.cpp, the same bits). Rows in parallel;
// a row never reads another. Semantics: torchaq/ops/proposal.py.
#include "proposal.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "linear_ce_kernels.h"
#include "proposal_kernels.h"

namespace torchaq {
namespace cpu {
namespace {

// x[j] = (x[j] - top) / T in place, or -inf where x[j] < floor (T = 1: no division, as the reference)
void exponents(float* x, int64_t n, float top, float t, float floor) {
  // (branch-free bodies on one pointer, so that the compiler vectorises them without alias checks)
  if (t == 1.0f) {
    for (int64_t j = 0; j < n; ++j) {
      const float v = x[j] - top;
      x[j] = x[j] < floor ? -INFINITY : v;
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const float v = (x[j] - top) / t;
      x[j] = x[j] < floor ? -INFINITY : v;
    }
  }
}

float block_sum(const float* w, int64_t m) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= m; j += 8)
    for (int l = 0; l < 8; ++l) acc[l] += w[j + l];
  for (; j < m; ++j) acc[0] += w[j];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

}  // namespace

at::Tensor proposal_weights_cpu(at::Tensor& weights, int64_t num_tail, const at::Tensor& logits_in,
                                const at::Tensor& floor_in, const at::Tensor& top_in, double temperature,
                                int64_t block) {
  TORCH_CHECK_VALUE(block >= 1, "block must be >= 1");
  TORCH_CHECK_VALUE(weights.dim() == 2 && weights.scalar_type() == at::kFloat && weights.is_contiguous(),
                    "weights must be a contiguous float32 (B, W) tensor");
  const int64_t B = weights.size(0), W = weights.size(1), N = num_tail;
  TORCH_CHECK_VALUE(logits_in.dim() == 2 && logits_in.size(0) == B && logits_in.scalar_type() == at::kFloat,
                    "logits must be a float32 (", B, ", H) tensor");
  const int64_t H = logits_in.size(1), span = N + (block - N % block) % block;
  TORCH_CHECK_VALUE(N >= 0 && W % block == 0 && W >= span + H, "weights must have a multiple of block=", block,
                    " columns, at least ", span + H, " for num_tail=", N, " and ", H, " head logits, got ", W);
  TORCH_CHECK_VALUE(floor_in.dim() == 1 && floor_in.size(0) == B && floor_in.scalar_type() == at::kFloat,
                    "floor must be a float32 (", B, ",) tensor");
  TORCH_CHECK_VALUE(top_in.dim() == 1 && top_in.size(0) == B && top_in.scalar_type() == at::kFloat,
                    "top must be a float32 (", B, ",) tensor");
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature), "temperature must be a finite number > 0");
  const at::Tensor logits = logits_in.contiguous(), floor = floor_in.contiguous(), top = top_in.contiguous();
  const int64_t nb = W / block;
  at::Tensor cum = at::empty({B, nb}, weights.options().dtype(at::kDouble));
  const float* lp = logits.data_ptr<float>();
  const float* fp = floor.data_ptr<float>();
  const float* tp = top.data_ptr<float>();
  float* wp = weights.data_ptr<float>();
  double* cp = cum.data_ptr<double>();
  const float t = float(temperature);
  const auto exp_kernel = lce_grad_kernel();  // a[i] exp(x - lse[i]) - 0: with a = 1, lse = 0, exp(x)
  // AVX2 kernels active: one pass per row (proposal_avx2.cpp, with the AVX2 tiles' exp); AVX-512 and
  // scalar keep the passes below, with their own exp
#if defined(TORCHAQ_X86_KERNELS)
  const bool fused = block % 8 == 0 && exp_kernel == &lce_grad_avx2;
#else
  const bool fused = false;
#endif
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    const float zero = 0.0f, one = 1.0f;
    for (int64_t b = b0; b < b1; ++b) {
      float* w = wp + b * W;
      // the row's layout: tail bounds, -inf padding, head logits, -inf padding
      for (int64_t j = N; j < span; ++j) w[j] = -INFINITY;
      std::memcpy(w + span, lp + b * H, sizeof(float) * H);
      for (int64_t j = span + H; j < W; ++j) w[j] = -INFINITY;
      if (fused) {  // the same bits in one pass over the row (proposal_avx2.cpp)
        proposal_row_avx2(w, W, tp[b], t, fp[b], block, cp + b * nb);
        continue;
      }
      // T = 1 and no floor: the exp kernel subtracts top itself (exp(x - top), the same float
      // subtraction as exponents()), so the row is read once less
      const bool plain = t == 1.0f && fp[b] == -INFINITY;
      if (!plain) {  // the bounds and the head logits, element by element into their exponents
        exponents(w, N, tp[b], t, fp[b]);
        exponents(w + span, H, tp[b], t, fp[b]);
      }
      exp_kernel(w, 1, W, plain ? tp + b : &zero, &one, nullptr, 0.0f);
      double run = 0.0;
      for (int64_t k = 0; k < nb; ++k) cp[b * nb + k] = run += double(block_sum(w + k * block, block));
    }
  });
  return cum;
}

}  // namespace cpu
}  // namespace torchaq
