// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3")
// for the CUDA C++ kernels that draw random numbers (random.cu, dropout.cu), so
// both read one stream: value v of a launch is lane v % 4 of
// philox(seed, offset / 4 + v / 4), taken as a uniform by `unit`.
// kernels/reference/attention.py (philox4x32, dropout_uniform) is its NumPy model.
#pragma once
#ifdef __CUDACC__
#include <cstdint>

namespace cutegrad {
namespace ops {

__device__ __forceinline__ uint4 philox(uint64_t seed, uint64_t counter) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return make_uint4(c0, c1, c2, c3);
}

// The top 24 bits as a float in [0, 1) (exact in fp32).
__device__ __forceinline__ float unit(uint32_t x) { return static_cast<float>(x >> 8) * (1.0f / 16777216.0f); }

// seed and offset of a launch: from device memory where the pointers are set (a captured
// graph's generator state, rewritten before each replay), the offset pointer's value plus
// the launch's fixed offset within the graph.
__device__ __forceinline__ uint64_t philox_seed(uint64_t seed, const void* seed_ptr) {
  return seed_ptr ? *static_cast<const uint64_t*>(seed_ptr) : seed;
}

__device__ __forceinline__ uint64_t philox_offset(uint64_t offset, const void* offset_ptr) {
  return (offset_ptr ? *static_cast<const uint64_t*>(offset_ptr) : 0) + offset;
}

// Blocks of `threads` for a grid-stride loop in which each thread takes one Philox draw (four
// values) of n, capped at 2^20 blocks (the loop covers the rest).
inline unsigned philox_grid(int64_t n, int threads) {
  const int64_t blocks = ((n + 3) / 4 + threads - 1) / threads, cap = int64_t(1) << 20;
  return static_cast<unsigned>(blocks < cap ? blocks : cap);
}

}  // namespace ops
}  // namespace cutegrad
#endif
