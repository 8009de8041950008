// ATen driver of the CPU PQ encoders: argument checks (the messages of torchaq.ops), the
// transposed codebooks and codeword norms, the work split over rows (at::parallel_for, one
// scratch buffer per task) and the run-time choice of the AVX2 or baseline row kernel
// (TORCHAQ_FORCE_SCALAR=1 or TORCHAQ_CPU_ISA=scalar force the baseline; both builds round alike).
// The algorithm is in encode_generic.h. Cost: O(N M K dsub) for the dot products plus
// O(N M K) per coordinate-descent round; memory O(M K) per thread, nothing per row.
#include "encode.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "encode_kernels.h"

namespace torchaq {
namespace cpu {
namespace {

bool use_avx2() {
#if defined(TORCHAQ_X86_KERNELS)
  const char* force = std::getenv("TORCHAQ_FORCE_SCALAR");
  if (force != nullptr && std::strcmp(force, "1") == 0) return false;
  const char* want = std::getenv("TORCHAQ_CPU_ISA");
  if (want != nullptr && std::strcmp(want, "scalar") == 0) return false;
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
#else
  return false;
#endif
}

// Mirrors torchaq.ops._check_encode (same messages, ValueError / TypeError).
void check_encode_args(const at::Tensor& x, const at::Tensor& codebooks) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be (N, D), got shape ", x.sizes());
  TORCH_CHECK_VALUE(codebooks.dim() == 3, "codebooks must be (M, K, dsub), got shape ", codebooks.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "x must be float32, got ", x.scalar_type());
  TORCH_CHECK_TYPE(codebooks.scalar_type() == at::kFloat, "codebooks must be float32, got ", codebooks.scalar_type());
  TORCH_CHECK_VALUE(codebooks.size(0) >= 1 && codebooks.size(1) >= 1 && codebooks.size(2) >= 1,
                    "codebooks must be non-empty (M, K, dsub), got shape ", codebooks.sizes());
  TORCH_CHECK_VALUE(x.size(1) == codebooks.size(0) * codebooks.size(2), "x has ", x.size(1),
                    " columns but codebooks (M, K, dsub) = ", codebooks.sizes(), " need M * dsub = ",
                    codebooks.size(0) * codebooks.size(2));
  TORCH_CHECK_VALUE(x.device() == codebooks.device(), "x is on ", x.device(), " but codebooks on ",
                    codebooks.device());
}

at::Tensor run_encode(const at::Tensor& x_in, const at::Tensor& cb_in, const at::Tensor* eta_in,
                      int64_t max_rounds) {
  const at::Tensor x = x_in.contiguous();
  const at::Tensor cb = cb_in.contiguous();
  const int64_t N = x.size(0), M = cb.size(0), K = cb.size(1), dsub = cb.size(2);
  at::Tensor codes = at::empty({N, M}, x.options().dtype(at::kLong));
  if (N == 0) return codes;
  const at::Tensor cbt = cb.transpose(1, 2).contiguous();  // (M, dsub, K)
  const at::Tensor code_sq = (cb * cb).sum(-1).contiguous();
  const at::Tensor half_sq = (code_sq * 0.5).contiguous();
  at::Tensor eta;
  EncodeProblem p{};
  p.x = x.data_ptr<float>();
  p.cbt = cbt.data_ptr<float>();
  p.half_sq = half_sq.data_ptr<float>();
  p.code_sq = code_sq.data_ptr<float>();
  if (eta_in != nullptr) {
    eta = eta_in->contiguous();
    p.eta = eta.data_ptr<float>();
  }
  p.codes = codes.data_ptr<int64_t>();
  p.M = M;
  p.K = K;
  p.dsub = dsub;
  p.max_rounds = max_rounds;
  auto kernel = use_avx2() ?
#if defined(TORCHAQ_X86_KERNELS)
                           &encode_rows_avx2
#else
                           &encode_rows_scalar
#endif
                           : &encode_rows_scalar;
  // a task of ~2^20 multiply-adds amortises its scratch buffer; rows are independent
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(1, M * K * (dsub + 2)));
  const int64_t scratch = encode_scratch_floats(p);
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(scratch);
    kernel(p, r0, r1, buf.data());
  });
  return codes;
}

}  // namespace

at::Tensor pq_encode_cpu(const at::Tensor& x, const at::Tensor& codebooks) {
  check_encode_args(x, codebooks);
  return run_encode(x, codebooks, nullptr, 0);
}

at::Tensor anisotropic_encode_cpu(const at::Tensor& x, const at::Tensor& codebooks, const at::Tensor& eta,
                                  int64_t max_rounds) {
  check_encode_args(x, codebooks);
  TORCH_CHECK_VALUE(eta.dim() == 1 && eta.size(0) == x.size(0), "eta must have shape (", x.size(0), ",), got ",
                    eta.sizes());
  TORCH_CHECK_TYPE(eta.scalar_type() == at::kFloat, "eta must be float32, got ", eta.scalar_type());
  TORCH_CHECK_VALUE(eta.device() == x.device(), "eta is on ", eta.device(), " but x on ", x.device());
  TORCH_CHECK_VALUE(max_rounds >= 0, "max_rounds must be >= 0, got ", max_rounds);
  return run_encode(x, codebooks, &eta, max_rounds);
}

}  // namespace cpu
}  // namespace torchaq
