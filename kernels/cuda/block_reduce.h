// Block-wide reductions for kernels that give one row to one block (nvcc only).
//
// Warp shuffles first, then one value per warp through shared memory; every
// thread gets the result.  `scratch` needs blockDim.x / 32 slots; the trailing
// __syncthreads lets the caller reuse it at once.
#pragma once
#ifdef __CUDACC__
#include <cuda_runtime.h>

namespace cutegrad {
namespace ops {

struct SumOf {
  template <typename A> __device__ __forceinline__ A operator()(A a, A b) const { return a + b; }
};
struct MaxOf {  // fmax semantics: NaN loses; callers treat non-finite maxima themselves
  template <typename A> __device__ __forceinline__ A operator()(A a, A b) const { return a > b || b != b ? a : b; }
};

template <typename A, typename F>
__device__ __forceinline__ A block_reduce(A v, F f, A* scratch) {
  for (int o = 16; o > 0; o >>= 1) v = f(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  A r = scratch[0];
  for (int w = 1; w < n_warps; ++w) r = f(r, scratch[w]);
  __syncthreads();
  return r;
}

}  // namespace ops
}  // namespace cutegrad
#endif  // __CUDACC__
