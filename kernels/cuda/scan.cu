// cumsum along one dimension of a contiguous tensor viewed as (outer, n, inner).
//
// Design: one thread per (outer, inner) line walks the n elements in order,
// accumulating in fp32 (fp64 for fp64 output, int64 for integer output) and
// storing every prefix: the same sequential order as NumPy's cumsum, so fp32
// results match the CPU reference bit for bit.  Neighbouring threads handle
// neighbouring inner positions, so loads coalesce when inner > 1; a cumsum
// along the last dimension of many short rows is one thread per row.  Long
// single lines are sequential (correct, not fast: a block-wide scan is future
// work).
//
// AOT specializations: compute fp32, fp64, int64.
#include <cuda_runtime.h>

#include "dtype_access.h"
#include "ops_args.h"

namespace cutegrad {
namespace ops {
namespace {

template <typename C>
__global__ void __launch_bounds__(256) cumsum_kernel(const ScanArgs a) {
  const int64_t lines = a.outer * a.inner;
  for (int64_t l = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; l < lines;
       l += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t base = (l / a.inner) * a.n * a.inner + l % a.inner;
    C acc = C(0);
    for (int64_t i = 0; i < a.n; ++i) {
      const int64_t off = base + i * a.inner;
      acc += load_as<C>(a.x, a.x_dtype, off);
      store_from<C>(a.out, a.out_dtype, off, acc);
    }
  }
}

}  // namespace

int cumsum_launch(const ScanArgs& a, void* stream) {
  const int64_t lines = a.outer * a.inner;
  if (lines == 0 || a.n == 0) return cudaSuccess;
  int64_t blocks = (lines + 255) / 256;
  if (blocks > (int64_t(1) << 20)) blocks = int64_t(1) << 20;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (a.compute == kComputeF32) cumsum_kernel<float><<<static_cast<unsigned>(blocks), 256, 0, s>>>(a);
  else if (a.compute == kComputeF64) cumsum_kernel<double><<<static_cast<unsigned>(blocks), 256, 0, s>>>(a);
  else cumsum_kernel<int64_t><<<static_cast<unsigned>(blocks), 256, 0, s>>>(a);
  return cudaGetLastError();
}

}  // namespace ops
}  // namespace cutegrad
