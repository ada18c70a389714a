// Fused dropout: the Philox keep mask generated and applied in one pass, the
// same kernel forward (on x) and backward (on dy, with the forward's seed and
// offset), so dropout costs one launch each way and stores no mask.
//
// Design: the mask is random.cu's scaled Bernoulli stream (philox.h): element v
// is kept iff unit(lane v % 4 of philox(seed, offset / 4 + v / 4)) < keep, so
// the kept elements are exactly those of `bernoulli_scaled` drawn from the same
// generator state.  One thread makes one Philox draw and handles its four
// elements; a grid-stride loop caps the grid at 2^20 blocks (philox_grid).  Kept values are
// x * (1 / keep) computed in fp32 (fp64 for float64) and rounded once, as
// torch's CUDA dropout does.  seed and offset come from device memory where
// their pointers are set (a captured graph's generator state): a replay draws
// a fresh mask and the backward regenerates its own forward's.
//
// Constraints: in and out contiguous (the frontend copies a strided input
// first), one floating dtype (f16, bf16, f32, f64), offset a multiple of 4.
//
// AOT specializations: one kernel; the dtype is a runtime switch (dtype_access.h).
#include <cuda_runtime.h>

#include <cstdint>

#include "dropout_args.h"
#include "dtype_access.h"
#include "philox.h"

namespace cutegrad {
namespace ops {
namespace {

constexpr int kThreads = 256;

template <typename C>
__device__ __forceinline__ void apply_group(const DropoutArgs& a, const uint4 r, int64_t g) {
  const uint32_t lanes[4] = {r.x, r.y, r.z, r.w};
  const C scale = static_cast<C>(a.scale);
#pragma unroll
  for (int l = 0; l < 4; ++l) {
    const int64_t v = g * 4 + l;
    if (v >= a.n) break;
    const C x = load_as<C>(a.in, a.dtype, v);
    store_from<C>(a.out, a.dtype, v, unit(lanes[l]) < a.keep ? x * scale : C(0));
  }
}

__global__ void __launch_bounds__(kThreads) dropout_kernel(const DropoutArgs a) {
  const uint64_t seed = philox_seed(a.seed, a.seed_ptr);
  const uint64_t offset = philox_offset(a.offset, a.offset_ptr);
  const int64_t groups = (a.n + 3) / 4;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * kThreads) {
    const uint4 r = philox(seed, offset / 4 + static_cast<uint64_t>(g));
    if (a.dtype == kF64) {
      apply_group<double>(a, r, g);
    } else {
      apply_group<float>(a, r, g);
    }
  }
}

}  // namespace

int dropout_launch(const DropoutArgs& a, void* stream) {
  if (a.n == 0) return cudaSuccess;
  dropout_kernel<<<philox_grid(a.n, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(a);
  return cudaGetLastError();
}

}  // namespace ops
}  // namespace cutegrad
