// Random tensors from counter-based Philox4x32-10 (philox.h): uniform, normal, randint
// and the scaled Bernoulli mask of dropout.
//
// Design: value v of a launch is lane v % 4 of Philox(key = seed,
// counter = offset / 4 + v / 4), so a launch is a pure function of
// (seed, offset) and the numbers do not depend on the grid shape.  seed and
// offset are read from device memory when their pointers are set: that is
// how a captured CUDA graph draws fresh numbers on every replay
// (cutegrad.graphs.rng writes the generator's state into a buffer before each
// replay; the kernel adds its fixed offset within the graph).  One thread
// makes four values; normal pairs lanes (0, 1) and (2, 3) through Box-Muller.
// Uniform values use the top 24 bits (fp32 resolution) for every dtype.
//
// AOT specializations: one kernel; the output dtype is a runtime switch.
#include <cuda_runtime.h>

#include <cstdint>

#include "dtype_access.h"
#include "ops_args.h"
#include "philox.h"

namespace cutegrad {
namespace ops {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) random_kernel(const RandomArgs a) {
  const uint64_t seed = philox_seed(a.seed, a.seed_ptr);
  const uint64_t offset = philox_offset(a.offset, a.offset_ptr);
  const int64_t groups = (a.n + 3) / 4;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * kThreads) {
    const uint4 r = philox(seed, offset / 4 + static_cast<uint64_t>(g));
    const uint32_t lanes[4] = {r.x, r.y, r.z, r.w};
    float vals[4];
    if (a.kind == kNormal) {
      for (int p = 0; p < 4; p += 2) {
        // 1 - u is in (0, 1], so the log is finite
        const float rad = sqrtf(-2.0f * logf(1.0f - unit(lanes[p])));
        const float ang = 6.2831853071795864769f * unit(lanes[p + 1]);
        vals[p] = rad * cosf(ang);
        vals[p + 1] = rad * sinf(ang);
      }
    }
    for (int l = 0; l < 4; ++l) {
      const int64_t v = g * 4 + l;
      if (v >= a.n) break;
      switch (a.kind) {
        case kUniform:
          store_from<double>(a.out, a.dtype, v, a.a + static_cast<double>(unit(lanes[l])) * (a.b - a.a));
          break;
        case kNormal:
          store_from<double>(a.out, a.dtype, v, a.a + a.b * static_cast<double>(vals[l]));
          break;
        case kRandint:
          store_from<int64_t>(a.out, a.dtype, v, a.low + static_cast<int64_t>(lanes[l] % static_cast<uint64_t>(a.range)));
          break;
        default:  // kBernoulliScaled
          store_from<float>(a.out, a.dtype, v, unit(lanes[l]) < static_cast<float>(a.a) ? static_cast<float>(a.b) : 0.0f);
          break;
      }
    }
  }
}

}  // namespace

int random_launch(const RandomArgs& a, void* stream) {
  if (a.n == 0) return cudaSuccess;
  random_kernel<<<philox_grid(a.n, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(a);
  return cudaGetLastError();
}

}  // namespace ops
}  // namespace cutegrad
