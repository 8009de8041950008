// Plain-data interface between torchaq::proposal_weights_ (proposal.cpp) and its AVX2 row kernel
// (proposal_avx2.cpp). Raw pointers only (see scan_kernels.h).
#pragma once
#include <cstdint>

namespace torchaq {
namespace cpu {

// One row w[0, W) laid out as proposal.cpp lays it out (tail bounds, -inf padding, head logits, -inf
// padding): w[j] <- exp((w[j] - top) / T), 0 where w[j] < floor; cum[k] <- the float64 running sum of
// the float32 sums of blocks of `block` entries (block a multiple of 8, W of block).
void proposal_row_avx2(float* w, int64_t W, float top, float t, float floor, int64_t block, double* cum);

}  // namespace cpu
}  // namespace torchaq
