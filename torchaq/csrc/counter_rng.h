// The counter-based random numbers of torchaq/ops/counter_rng.py in C++ (the same 32-bit hash, so the
// same numbers): used by the rejection rounds (reject.cpp) and the one-op sampler (layer_sample.cpp).
#pragma once
#include <cstdint>

namespace torchaq {
namespace cpu {

// lowbias32 (counter_rng.py: mix32): uint32 arithmetic wraps like the reference's masks.
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

// row_keys(seed): both halves of an int64 seed hashed into a key in [0, 2**32).
inline uint32_t row_key(int64_t seed) {
  const uint64_t s = uint64_t(seed);
  return mix32(uint32_t(s) ^ mix32(uint32_t(s >> 32) ^ 0x9E3779B9u));
}

// key_uniforms(key, stream, n)[j]: a 53-bit uniform in (0, 1).
inline double key_uniform(uint32_t key, int64_t stream, int64_t j) {
  const uint32_t ctr = mix32(uint32_t(j) ^ mix32(uint32_t(stream + 0x27D4EB2F)));
  const uint32_t x = mix32(key ^ ctr) ^ key;
  const uint64_t hi = mix32(x) >> 5, lo = mix32(x ^ 0x1B56C4E9u) >> 6;
  return (double(hi * 67108864u + lo) + 0.5) / 9007199254740992.0;
}

}  // namespace cpu
}  // namespace torchaq
