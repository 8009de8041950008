// Baseline build of the PQ encoder row kernel (encode_generic.h): whatever the compiler's default
// target allows (SSE2 on x86-64).
#include "encode_generic.h"

namespace torchaq {
namespace cpu {

void encode_rows_scalar(const EncodeProblem& p, int64_t r0, int64_t r1, float* scratch) {
  encode_rows_impl(p, r0, r1, scratch);
}

}  // namespace cpu
}  // namespace torchaq
