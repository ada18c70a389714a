// One-launch column sum of a contiguous (rows, cols) matrix: the bias gradient
// of a linear layer (dL/db = the sum of dL/dy over every row), which a
// two-stage reduction would take two launches for.
//
// Design: a block is 32 columns x 8 row lanes (256 threads); a warp reads 32
// adjacent elements of one row (coalesced).  The grid is (column tiles,
// splits): block (t, s) sums its share of the rows, reduces the 8 lanes in
// shared memory and, with splits > 1, stores 32 partial sums.  After a
// __threadfence its thread 0 takes a ticket from the tile's counter; the block
// that takes the last ticket adds the tile's partials in split order (so the
// sum is the same on every run, unlike atomics), writes the output in its
// dtype and resets the counter to zero for the next launch (the counters are
// a persistent zeroed buffer per device and stream, so launches on one stream
// never share them concurrently; frontend/backends/cuda/column_sum.py).
// Accumulation in fp32, fp64 for float64 inputs or outputs.
//
// Constraints: input contiguous, floating dtypes (f16, bf16, f32, f64), cols < 2^31.
//
// AOT specializations: one kernel per accumulator type (float, double); dtypes are
// runtime switches (dtype_access.h).
#include <cuda_runtime.h>

#include <cstdint>

#include "column_sum_args.h"
#include "dtype_access.h"

namespace cutegrad {
namespace ops {
namespace {

constexpr int kTileCols = 32, kRowLanes = 8;

template <typename C>
__global__ void __launch_bounds__(kTileCols * kRowLanes) column_sum_kernel(const ColumnSumArgs a) {
  __shared__ C lanes[kRowLanes][kTileCols];
  __shared__ bool last;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kTileCols + tx;
  const int64_t chunk = (a.rows + a.splits - 1) / a.splits;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t r1 = r0 + chunk < a.rows ? r0 + chunk : a.rows;
  C acc = 0;
  if (col < a.cols) {
    for (int64_t r = r0 + ty; r < r1; r += kRowLanes) acc += load_as<C>(a.in, a.in_dtype, r * a.cols + col);
  }
  lanes[ty][tx] = acc;
  __syncthreads();
  if (ty == 0) {
    C sum = 0;
#pragma unroll
    for (int l = 0; l < kRowLanes; ++l) sum += lanes[l][tx];
    if (a.splits == 1) {
      if (col < a.cols) store_from<C>(a.out, a.out_dtype, col, sum);
    } else if (col < a.cols) {
      static_cast<C*>(a.partials)[static_cast<int64_t>(blockIdx.y) * a.cols + col] = sum;
    }
  }
  if (a.splits == 1) return;
  // make this block's partials visible device-wide before taking a ticket
  __threadfence();
  __syncthreads();
  if (tx == 0 && ty == 0) last = atomicAdd(&a.counters[blockIdx.x], 1u) == static_cast<unsigned>(a.splits - 1);
  __syncthreads();
  if (!last) return;
  __threadfence();  // every other block's partials are visible once their tickets are
  if (ty == 0 && col < a.cols) {
    const volatile C* part = static_cast<const volatile C*>(a.partials);
    C sum = 0;
    for (int s = 0; s < a.splits; ++s) sum += part[static_cast<int64_t>(s) * a.cols + col];
    store_from<C>(a.out, a.out_dtype, col, sum);
  }
  if (tx == 0 && ty == 0) a.counters[blockIdx.x] = 0;
}

}  // namespace

int column_sum_launch(const ColumnSumArgs& a, void* stream) {
  if (a.cols == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((a.cols + kTileCols - 1) / kTileCols), static_cast<unsigned>(a.splits));
  const dim3 block(kTileCols, kRowLanes);
  auto s = static_cast<cudaStream_t>(stream);
  if (a.in_dtype == kF64 || a.out_dtype == kF64) {
    column_sum_kernel<double><<<grid, block, 0, s>>>(a);
  } else {
    column_sum_kernel<float><<<grid, block, 0, s>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace ops
}  // namespace cutegrad
