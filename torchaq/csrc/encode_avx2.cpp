// AVX2 build of the PQ encoder row kernel (encode_generic.h); compiled with -mavx2 -mfma (setup.py)
// and called only when the CPU reports both (encode.cpp). -ffp-contract=off keeps its rounding
// identical to the baseline build.
#include "encode_generic.h"

namespace torchaq {
namespace cpu {

void encode_rows_avx2(const EncodeProblem& p, int64_t r0, int64_t r1, float* scratch) {
  encode_rows_impl(p, r0, r1, scratch);
}

}  // namespace cpu
}  // namespace torchaq
