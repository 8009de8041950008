// Plain-data interface between the ATen driver of the PQ encoders (encode.cpp) and the per-ISA
// row kernels (encode_scalar.cpp, encode_avx2.cpp), which are the same source (encode_generic.h)
// compiled with different -m flags. As in scan_kernels.h: raw pointers and PODs only, so that no
// inline function with external linkage is instantiated with AVX2 code.
#pragma once
#include <cstdint>

namespace torchaq {
namespace cpu {

// One encoding problem: rows x (N, D = M * dsub) against codebooks (M, K, dsub).
struct EncodeProblem {
  const float* x;        // (N, D) row-major
  const float* cbt;      // (M, dsub, K): codebooks transposed so that one (m, t) is K contiguous floats
  const float* half_sq;  // (M, K): |C_m[j]|^2 / 2
  const float* code_sq;  // (M, K): |C_m[j]|^2
  const float* eta;      // (N,) per-row h_par / h_perp; nullptr: plain L2 codes
  int64_t* codes;        // (N, M) output
  int64_t M, K, dsub;
  int64_t max_rounds;    // coordinate-descent rounds (0: the L2 codes)
};

// Floats of scratch one call of encode_rows needs.
// (K = 16 with AVX2 adds the eight-row block of descend_rows8_k16: (M, 16, 8) + 3 (M, 8).)
inline int64_t encode_scratch_floats(const EncodeProblem& p) {
  return 2 * p.M * p.K + p.M + 2 * p.K + 64 + (p.K == 16 ? p.M * 16 * 8 + 3 * p.M * 8 : 0);
}

// Encodes rows [r0, r1) with `scratch` (encode_scratch_floats floats, owned by the caller).
void encode_rows_scalar(const EncodeProblem& p, int64_t r0, int64_t r1, float* scratch);
void encode_rows_avx2(const EncodeProblem& p, int64_t r0, int64_t r1, float* scratch);

}  // namespace cpu
}  // namespace torchaq
