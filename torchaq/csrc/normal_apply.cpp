// CPU kernel of torchaq::anisotropic_normal_apply, the matrix-free product of the joint
// anisotropic codebook update (Guo et al. 2020, section 4.2; torchaq/ops/normal_apply.py):
//   s_i         = coef_i <x~_i, x_i>,   x~_i = concat_m C_m[codes[i, m]]
//   out[m, j]  += x~_{i,m} + s_i x_{i,m}        for every row i with codes[i, m] = j
// Two passes: (1) s_i, parallel over rows; (2) the scatter-add, parallel over subspaces, each
// task owning the codewords of its subspaces and adding the rows in order 0..N-1. So no
// per-thread copies of the output are needed and the result does not depend on the thread count.
// Cost: O(N M dsub) reads of x and the codebooks per pass; memory: N floats for s.
// Also here: torchaq::anisotropic_normal_rhs, the right-hand side and the diagonal of the same
// system (b[m, j] = sum eta_i x_{i,m}, diag[m, j] = sum 1 + coef_i x_{i,m}^2), one pass like pass 2.
#include "normal_apply.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <tuple>

namespace torchaq {
namespace cpu {
namespace {

template <typename CodeT, int64_t DS>
void normal_apply_kernel(const float* x, const CodeT* codes, const float* coef, const float* cb, float* out,
                         float* s, int64_t N, int64_t M, int64_t K, int64_t dsub_rt) {
  const int64_t dsub = DS > 0 ? DS : dsub_rt, D = M * dsub;
  std::atomic<bool> bad{false};
  const int64_t row_grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, D));
  at::parallel_for(0, N, row_grain, [&](int64_t r0, int64_t r1) {
    bool local_bad = false;
    for (int64_t i = r0; i < r1; ++i) {
      const float* __restrict xi = x + i * D;
      const CodeT* __restrict ci = codes + i * M;
      float acc[4] = {0.f, 0.f, 0.f, 0.f};  // four partial sums break the add chain
      for (int64_t m = 0; m < M; ++m) {
        int64_t k = int64_t(ci[m]);
        if (k < 0 || k >= K) {
          local_bad = true;
          k = 0;
        }
        const float* __restrict cw = cb + (m * K + k) * dsub;
        const float* __restrict xm = xi + m * dsub;
        float dot = 0.f;
        for (int64_t t = 0; t < dsub; ++t) dot += cw[t] * xm[t];
        acc[m & 3] += dot;
      }
      s[i] = coef[i] * ((acc[0] + acc[1]) + (acc[2] + acc[3]));
    }
    if (local_bad) bad = true;
  });
  TORCH_CHECK_VALUE(!bad.load(), "codes must be in [0, ", K, ")");
  // pass 2: a task owns subspaces [m0, m1) and reads that slice of every row
  const int64_t sub_grain = std::max<int64_t>(1, M / std::max<int64_t>(1, 4 * at::get_num_threads()));
  at::parallel_for(0, M, sub_grain, [&](int64_t m0, int64_t m1) {
    for (int64_t i = 0; i < N; ++i) {
      const float* __restrict xi = x + i * D;
      const CodeT* __restrict ci = codes + i * M;
      const float si = s[i];
      for (int64_t m = m0; m < m1; ++m) {
        const int64_t k = int64_t(ci[m]);
        const float* __restrict cw = cb + (m * K + k) * dsub;
        const float* __restrict xm = xi + m * dsub;
        float* __restrict o = out + (m * K + k) * dsub;
        for (int64_t t = 0; t < dsub; ++t) o[t] += cw[t] + si * xm[t];
      }
    }
  });
}

template <typename CodeT>
void dispatch_dsub(const float* x, const CodeT* codes, const float* coef, const float* cb, float* out, float* s,
                   int64_t N, int64_t M, int64_t K, int64_t dsub) {
  switch (dsub) {
    case 1: return normal_apply_kernel<CodeT, 1>(x, codes, coef, cb, out, s, N, M, K, dsub);
    case 2: return normal_apply_kernel<CodeT, 2>(x, codes, coef, cb, out, s, N, M, K, dsub);
    case 4: return normal_apply_kernel<CodeT, 4>(x, codes, coef, cb, out, s, N, M, K, dsub);
    default: return normal_apply_kernel<CodeT, 0>(x, codes, coef, cb, out, s, N, M, K, dsub);
  }
}

// b[m, j] += eta_i x_{i,m} and diag[m, j] += 1 + coef_i x_{i,m}^2 for the rows with codes[i, m] = j:
// parallel over subspaces like pass 2 above (rows in order; no dependence on the thread count).
template <typename CodeT, int64_t DS>
void normal_rhs_kernel(const float* x, const CodeT* codes, const float* eta, const float* coef, float* rhs,
                       float* diag, int64_t N, int64_t M, int64_t K, int64_t dsub_rt) {
  const int64_t dsub = DS > 0 ? DS : dsub_rt, D = M * dsub;
  std::atomic<bool> bad{false};
  const int64_t sub_grain = std::max<int64_t>(1, M / std::max<int64_t>(1, 4 * at::get_num_threads()));
  at::parallel_for(0, M, sub_grain, [&](int64_t m0, int64_t m1) {
    bool local_bad = false;
    for (int64_t i = 0; i < N; ++i) {
      const float* __restrict xi = x + i * D;
      const CodeT* __restrict ci = codes + i * M;
      const float ei = eta[i], qi = coef[i];
      for (int64_t m = m0; m < m1; ++m) {
        const int64_t k = int64_t(ci[m]);
        if (k < 0 || k >= K) {
          local_bad = true;
          continue;
        }
        const float* __restrict xm = xi + m * dsub;
        float* __restrict r = rhs + (m * K + k) * dsub;
        float* __restrict g = diag + (m * K + k) * dsub;
        for (int64_t t = 0; t < dsub; ++t) {
          r[t] += ei * xm[t];
          g[t] += 1.f + qi * xm[t] * xm[t];
        }
      }
    }
    if (local_bad) bad = true;
  });
  TORCH_CHECK_VALUE(!bad.load(), "codes must be in [0, ", K, ")");
}

template <typename CodeT>
void dispatch_rhs(const float* x, const CodeT* codes, const float* eta, const float* coef, float* rhs, float* diag,
                  int64_t N, int64_t M, int64_t K, int64_t dsub) {
  switch (dsub) {
    case 1: return normal_rhs_kernel<CodeT, 1>(x, codes, eta, coef, rhs, diag, N, M, K, dsub);
    case 2: return normal_rhs_kernel<CodeT, 2>(x, codes, eta, coef, rhs, diag, N, M, K, dsub);
    case 4: return normal_rhs_kernel<CodeT, 4>(x, codes, eta, coef, rhs, diag, N, M, K, dsub);
    default: return normal_rhs_kernel<CodeT, 0>(x, codes, eta, coef, rhs, diag, N, M, K, dsub);
  }
}

}  // namespace

// Mirrors torchaq.ops.normal_apply.check_normal_rhs_args (same messages, ValueError / TypeError).
std::tuple<at::Tensor, at::Tensor> normal_rhs_cpu(const at::Tensor& x_in, const at::Tensor& codes_in,
                                                  const at::Tensor& eta_in, const at::Tensor& coef_in,
                                                  int64_t num_codewords) {
  TORCH_CHECK_VALUE(x_in.dim() == 2, "x must be (N, D), got shape ", x_in.sizes());
  TORCH_CHECK_VALUE(codes_in.dim() == 2, "codes must be (N, M), got shape ", codes_in.sizes());
  TORCH_CHECK_VALUE(num_codewords >= 1, "num_codewords must be >= 1, got ", num_codewords);
  const int64_t N = x_in.size(0), M = codes_in.size(1), K = num_codewords;
  TORCH_CHECK_VALUE(M >= 1 && x_in.size(1) % M == 0, "x has ", x_in.size(1), " columns, not a multiple of M = ", M,
                    " (codes.shape[1])");
  TORCH_CHECK_TYPE(eta_in.scalar_type() == at::kFloat, "eta must be float32, got ", eta_in.scalar_type());
  TORCH_CHECK_VALUE(eta_in.dim() == 1 && eta_in.size(0) == N, "eta must have shape (", N, ",), got ", eta_in.sizes());
  TORCH_CHECK_TYPE(x_in.scalar_type() == at::kFloat, "x must be float32, got ", x_in.scalar_type());
  TORCH_CHECK_TYPE(coef_in.scalar_type() == at::kFloat, "coef must be float32, got ", coef_in.scalar_type());
  TORCH_CHECK_TYPE(codes_in.scalar_type() == at::kLong || codes_in.scalar_type() == at::kByte,
                   "codes must be int64 or uint8, got ", codes_in.scalar_type());
  TORCH_CHECK_VALUE(codes_in.size(0) == N, "codes must have shape (", N, ", ", M, "), got ", codes_in.sizes());
  TORCH_CHECK_VALUE(coef_in.dim() == 1 && coef_in.size(0) == N, "coef must have shape (", N, ",), got ",
                    coef_in.sizes());
  const int64_t dsub = x_in.size(1) / M;
  const at::Tensor x = x_in.contiguous(), codes = codes_in.contiguous(), eta = eta_in.contiguous();
  const at::Tensor coef = coef_in.contiguous();
  at::Tensor rhs = at::zeros({M, K, dsub}, x.options()), diag = at::zeros({M, K, dsub}, x.options());
  if (N == 0) return {rhs, diag};
  if (codes.scalar_type() == at::kByte) {
    dispatch_rhs<uint8_t>(x.data_ptr<float>(), codes.data_ptr<uint8_t>(), eta.data_ptr<float>(),
                          coef.data_ptr<float>(), rhs.data_ptr<float>(), diag.data_ptr<float>(), N, M, K, dsub);
  } else {
    dispatch_rhs<int64_t>(x.data_ptr<float>(), codes.data_ptr<int64_t>(), eta.data_ptr<float>(),
                          coef.data_ptr<float>(), rhs.data_ptr<float>(), diag.data_ptr<float>(), N, M, K, dsub);
  }
  return {rhs, diag};
}

// Mirrors torchaq.ops.normal_apply.check_normal_apply_args (same messages, ValueError / TypeError).
at::Tensor normal_apply_cpu(const at::Tensor& x_in, const at::Tensor& codes_in, const at::Tensor& coef_in,
                            const at::Tensor& cb_in) {
  TORCH_CHECK_VALUE(x_in.dim() == 2, "x must be (N, D), got shape ", x_in.sizes());
  TORCH_CHECK_VALUE(cb_in.dim() == 3, "codebooks must be (M, K, dsub), got shape ", cb_in.sizes());
  TORCH_CHECK_VALUE(codes_in.dim() == 2, "codes must be (N, M), got shape ", codes_in.sizes());
  TORCH_CHECK_TYPE(x_in.scalar_type() == at::kFloat, "x must be float32, got ", x_in.scalar_type());
  TORCH_CHECK_TYPE(coef_in.scalar_type() == at::kFloat, "coef must be float32, got ", coef_in.scalar_type());
  TORCH_CHECK_TYPE(cb_in.scalar_type() == at::kFloat, "codebooks must be float32, got ", cb_in.scalar_type());
  TORCH_CHECK_TYPE(codes_in.scalar_type() == at::kLong || codes_in.scalar_type() == at::kByte,
                   "codes must be int64 or uint8, got ", codes_in.scalar_type());
  const int64_t N = x_in.size(0), M = cb_in.size(0), K = cb_in.size(1), dsub = cb_in.size(2);
  TORCH_CHECK_VALUE(M >= 1 && K >= 1 && dsub >= 1, "codebooks must be non-empty (M, K, dsub), got shape ",
                    cb_in.sizes());
  TORCH_CHECK_VALUE(x_in.size(1) == M * dsub, "x has ", x_in.size(1), " columns but codebooks (M, K, dsub) = ",
                    cb_in.sizes(), " need M * dsub = ", M * dsub);
  TORCH_CHECK_VALUE(codes_in.size(0) == N && codes_in.size(1) == M, "codes must have shape (", N, ", ", M,
                    "), got ", codes_in.sizes());
  TORCH_CHECK_VALUE(coef_in.dim() == 1 && coef_in.size(0) == N, "coef must have shape (", N, ",), got ",
                    coef_in.sizes());
  const at::Tensor x = x_in.contiguous(), codes = codes_in.contiguous(), coef = coef_in.contiguous();
  const at::Tensor cb = cb_in.contiguous();
  at::Tensor out = at::zeros({M, K, dsub}, cb.options());
  if (N == 0) return out;
  at::Tensor s = at::empty({N}, x.options());
  if (codes.scalar_type() == at::kByte) {
    dispatch_dsub<uint8_t>(x.data_ptr<float>(), codes.data_ptr<uint8_t>(), coef.data_ptr<float>(),
                           cb.data_ptr<float>(), out.data_ptr<float>(), s.data_ptr<float>(), N, M, K, dsub);
  } else {
    dispatch_dsub<int64_t>(x.data_ptr<float>(), codes.data_ptr<int64_t>(), coef.data_ptr<float>(),
                           cb.data_ptr<float>(), out.data_ptr<float>(), s.data_ptr<float>(), N, M, K, dsub);
  }
  return out;
}

}  // namespace cpu
}  // namespace torchaq
