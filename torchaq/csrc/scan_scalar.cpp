// Scalar fallback: the portable kernels compiled with the baseline x86-64 / aarch64 flags.
// Also what TORCHAQ_FORCE_SCALAR=1 selects, which the tests use as a cross-check of the SIMD paths.
#include "scan_generic.h"

namespace torchaq {
namespace cpu {

void topk4_scalar(const Topk4Args& a, const Task& t) { topk4_generic(a, t); }
void qscore4_scalar(const Topk4Args& a, const Task& t) { qscore4_generic(a, t); }
void compute_lut_scalar(const float* q, const float* c, const float* ct, int64_t b0, int64_t b1, int64_t M,
                      int64_t K, int64_t dsub, float* out) {
  compute_lut_generic(q, c, ct, b0, b1, M, K, dsub, out);
}
void topk8_scalar(const FloatScanArgs& a, const Task& t) { topk8_generic(a, t); }
void score4_scalar(const FloatScanArgs& a, const Task& t) { score4_generic(a, t); }
void score8_scalar(const FloatScanArgs& a, const Task& t) { score8_generic(a, t); }

}  // namespace cpu
}  // namespace torchaq
