// Stable sort (and top-k) along one dimension of a contiguous tensor viewed
// as (outer, n, inner): values and int64 indices of the first `count`
// entries, ascending or descending, NaN ordered as the largest value (torch).
//
// Design: rank sort.  The element at position i of a line lands at rank
// #{j : x_j before x_i} where "before" is the strict order plus, for equal
// keys, j < i (this makes the result stable in both directions).  One block
// per line stages the line in shared memory when it fits (up to 6144 fp64
// keys), every thread ranks its elements against the whole line and writes
// those with rank < count.  O(n^2) comparisons per line: right for the short
// lines of top-k sampling and small sorts; a radix sort for long lines is
// future work.
//
// AOT specializations: keys compared as fp64 (every float dtype exactly) or
// int64 (every integer dtype and bool).
#include <cuda_runtime.h>

#include "dtype_access.h"
#include "ops_args.h"

namespace cutegrad {
namespace ops {
namespace {

constexpr int kThreads = 256;
constexpr int kSharedKeys = 6144;

template <typename C> __device__ __forceinline__ bool before(C a, int64_t ia, C b, int64_t ib, bool descending) {
  const bool na = m_isnan(a), nb = m_isnan(b);
  bool strict;
  if (na || nb) {
    strict = descending ? (na && !nb) : (!na && nb);
    if (na && nb) strict = false;
  } else {
    strict = descending ? a > b : a < b;
  }
  if (strict) return true;
  const bool equal = (na && nb) || (!na && !nb && a == b);
  return equal && ia < ib;
}

template <typename C>
__global__ void __launch_bounds__(kThreads) sort_kernel(const SortArgs a) {
  __shared__ C keys[kSharedKeys];
  const bool staged = a.n <= kSharedKeys;
  for (int64_t line = blockIdx.x; line < a.outer * a.inner; line += gridDim.x) {
    const int64_t o = line / a.inner, k = line % a.inner;
    const int64_t base = o * a.n * a.inner + k;
    if (staged) {
      __syncthreads();
      for (int64_t j = threadIdx.x; j < a.n; j += kThreads) keys[j] = load_as<C>(a.x, a.dtype, base + j * a.inner);
      __syncthreads();
    }
    for (int64_t i = threadIdx.x; i < a.n; i += kThreads) {
      const C xi = staged ? keys[i] : load_as<C>(a.x, a.dtype, base + i * a.inner);
      int64_t rank = 0;
      for (int64_t j = 0; j < a.n; ++j) {
        const C xj = staged ? keys[j] : load_as<C>(a.x, a.dtype, base + j * a.inner);
        rank += before(xj, j, xi, i, a.descending != 0);
      }
      if (rank < a.count) {
        const int64_t out = o * a.count * a.inner + rank * a.inner + k;
        store_from<C>(a.values, a.dtype, out, xi);
        a.indices[out] = i;
      }
    }
  }
}

}  // namespace

int sort_launch(const SortArgs& a, void* stream) {
  const int64_t lines = a.outer * a.inner;
  if (lines == 0 || a.n == 0 || a.count == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(lines < (int64_t(1) << 20) ? lines : (int64_t(1) << 20));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool is_float = a.dtype == kF16 || a.dtype == kBF16 || a.dtype == kF32 || a.dtype == kF64;
  if (is_float) sort_kernel<double><<<blocks, kThreads, 0, s>>>(a);
  else sort_kernel<int64_t><<<blocks, kThreads, 0, s>>>(a);
  return cudaGetLastError();
}

}  // namespace ops
}  // namespace cutegrad
