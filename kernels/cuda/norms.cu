// layer_norm and rms_norm forward over the last dimensions of a contiguous
// tensor viewed as (rows, n); they also return the per-row statistics (mean
// and rstd, fp32 or fp64) that the backward, written in terms of other ops,
// reuses.
//
// Design: one block per row, 32..256 threads by row length; passes over the
// row are coalesced and re-read from cache instead of held in registers, so
// any n works.  layer_norm takes the mean first and then the mean of squared
// deviations (two passes: no cancellation, unlike E[x^2] - E[x]^2);
// rms_norm needs one pass for the statistic.  The final pass applies weight
// and bias, read through their own dtypes (fp32 master weights under bf16
// activations work), and rounds once.
//
// Backward: one block per row computes dx from the saved mean/rstd with two
// block reductions (sum of h and of h * xhat, h = dy * weight); a second
// kernel sums dweight and dbias over rows with blocks of 32 columns
// (coalesced) x 8 row-lanes.  With few column tiles (a 256-wide norm gives 8)
// the rows are cut into up to 1024 chunks along blockIdx.y (reduce_split in
// ops_args.h, >= 64 rows a chunk); each block writes per-chunk partials to a
// workspace the frontend allocates, and a finishing kernel adds the chunks of
// each column.  Every sum runs in a fixed order, so the parameter gradients
// have the same bits on every run (no atomics, no memset, graph-capturable).
//
// AOT specializations: fp32, fp16, bf16, fp64 inputs (forward, dx, dweight/dbias
// and its finishing kernel in fp32 or fp64).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "block_reduce.h"
#include "dtype_access.h"
#include "ops_args.h"

namespace cutegrad {
namespace ops {
namespace {

template <typename T>
__global__ void __launch_bounds__(256) norm_kernel(const NormArgs a) {
  using A = typename AccOf<T>::type;
  __shared__ A scratch[8];
  const A inv_n = A(1) / static_cast<A>(a.n);
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(a.x) + row * a.n;
    T* y = static_cast<T*>(a.y) + row * a.n;
    A mean = A(0), rstd;
    if (a.rms) {
      A s = A(0);
      for (int64_t i = threadIdx.x; i < a.n; i += blockDim.x) { A v = widen(x[i]); s += v * v; }
      rstd = A(1) / m_sqrt(block_reduce(s, SumOf(), scratch) * inv_n + static_cast<A>(a.eps));
    } else {
      A s = A(0);
      for (int64_t i = threadIdx.x; i < a.n; i += blockDim.x) s += widen(x[i]);
      mean = block_reduce(s, SumOf(), scratch) * inv_n;
      A q = A(0);
      for (int64_t i = threadIdx.x; i < a.n; i += blockDim.x) { A d = widen(x[i]) - mean; q += d * d; }
      rstd = A(1) / m_sqrt(block_reduce(q, SumOf(), scratch) * inv_n + static_cast<A>(a.eps));
    }
    for (int64_t i = threadIdx.x; i < a.n; i += blockDim.x) {
      A v = (widen(x[i]) - mean) * rstd;
      if (a.weight) v *= load_as<A>(a.weight, a.weight_dtype, i);
      if (a.bias) v += load_as<A>(a.bias, a.bias_dtype, i);
      y[i] = narrow<T>(v);
    }
    if (threadIdx.x == 0) {
      if (a.mean) store_from<A>(a.mean, a.stat_dtype, row, mean);
      store_from<A>(a.rstd, a.stat_dtype, row, rstd);
    }
  }
}

template <typename T>
int launch(const NormArgs& a, cudaStream_t s) {
  int threads = 32;
  while (threads < 256 && threads < a.n) threads <<= 1;
  const int64_t cap = int64_t(1) << 20;
  norm_kernel<T><<<static_cast<unsigned>(a.rows < cap ? a.rows : cap), threads, 0, s>>>(a);
  return cudaGetLastError();
}


template <typename T>
__global__ void __launch_bounds__(256) norm_dx_kernel(const NormBackwardArgs a) {
  using A = typename AccOf<T>::type;
  __shared__ A scratch[8];
  const A inv_n = A(1) / static_cast<A>(a.n);
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(a.x) + row * a.n;
    const T* dy = static_cast<const T*>(a.dy) + row * a.n;
    T* dx = static_cast<T*>(a.dx) + row * a.n;
    const A mean = a.mean ? load_as<A>(a.mean, a.stat_dtype, row) : A(0);
    const A rstd = load_as<A>(a.rstd, a.stat_dtype, row);
    A sh = A(0), shx = A(0);
    for (int64_t i = threadIdx.x; i < a.n; i += blockDim.x) {
      A h = widen(dy[i]);
      if (a.weight) h *= load_as<A>(a.weight, a.weight_dtype, i);
      sh += h;
      shx += h * (widen(x[i]) - mean) * rstd;
    }
    sh = block_reduce(sh, SumOf(), scratch) * inv_n;
    shx = block_reduce(shx, SumOf(), scratch) * inv_n;
    if (a.rms) sh = A(0);
    for (int64_t i = threadIdx.x; i < a.n; i += blockDim.x) {
      A h = widen(dy[i]);
      if (a.weight) h *= load_as<A>(a.weight, a.weight_dtype, i);
      const A xhat = (widen(x[i]) - mean) * rstd;
      dx[i] = narrow<T>(rstd * (h - sh - xhat * shx));
    }
  }
}

constexpr int kParamCols = 32;   // columns per dparams block (coalesced along a row)
constexpr int kParamLanes = 8;   // row-lanes per dparams block
constexpr int kMinRowsPerLane = 8;

// Block (32 columns, 8 row-lanes) over the rows [y * chunk, (y + 1) * chunk)
// of chunk y = blockIdx.y; the row-lanes combine in a fixed order.  With one
// chunk the block stores dweight/dbias, otherwise its partials go to
// pw/pb[y * n + c] for norm_dparams_finish_kernel.
template <typename T>
__global__ void __launch_bounds__(256) norm_dparams_kernel(const NormBackwardArgs a, int64_t chunk,
                                                          typename AccOf<T>::type* pw, typename AccOf<T>::type* pb) {
  using A = typename AccOf<T>::type;
  __shared__ A sw[kParamLanes][kParamCols + 1];
  __shared__ A sb[kParamLanes][kParamCols + 1];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kParamCols + threadIdx.x;
  const int64_t r_begin = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t r_end = r_begin + chunk < a.rows ? r_begin + chunk : a.rows;
  const T* dy = static_cast<const T*>(a.dy);
  const T* x = static_cast<const T*>(a.x);
  A accw = A(0), accb = A(0);
  if (c < a.n) {
    int64_t r = r_begin + threadIdx.y;
    // Four rows at a time with all dy/x loads issued before the statistics'
    // dtype switch, so each thread keeps eight loads in flight.
    constexpr int kUnroll = 4;
    for (; r + (kUnroll - 1) * kParamLanes < r_end; r += kUnroll * kParamLanes) {
      A g[kUnroll], xv[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        g[u] = widen(dy[(r + u * kParamLanes) * a.n + c]);
        xv[u] = widen(x[(r + u * kParamLanes) * a.n + c]);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t ru = r + u * kParamLanes;
        const A mean = a.mean ? load_as<A>(a.mean, a.stat_dtype, ru) : A(0);
        accw += g[u] * ((xv[u] - mean) * load_as<A>(a.rstd, a.stat_dtype, ru));
        accb += g[u];
      }
    }
    for (; r < r_end; r += kParamLanes) {
      const A g = widen(dy[r * a.n + c]);
      const A mean = a.mean ? load_as<A>(a.mean, a.stat_dtype, r) : A(0);
      accw += g * ((widen(x[r * a.n + c]) - mean) * load_as<A>(a.rstd, a.stat_dtype, r));
      accb += g;
    }
  }
  sw[threadIdx.y][threadIdx.x] = accw;
  sb[threadIdx.y][threadIdx.x] = accb;
  __syncthreads();
  if (threadIdx.y == 0 && c < a.n) {
    A w = A(0), b = A(0);
    for (int k = 0; k < kParamLanes; ++k) {
      w += sw[k][threadIdx.x];
      b += sb[k][threadIdx.x];
    }
    if (pw) {
      pw[blockIdx.y * a.n + c] = w;
      pb[blockIdx.y * a.n + c] = b;
    } else {
      if (a.dweight) store_from<A>(a.dweight, a.dweight_dtype, c, w);
      if (a.dbias) store_from<A>(a.dbias, a.dbias_dtype, c, b);
    }
  }
}

// dweight/dbias[c] = sums of the split partials of column c: 8 lanes stride
// over the chunks, then combine in lane order.
template <typename A>
__global__ void __launch_bounds__(256) norm_dparams_finish_kernel(const NormBackwardArgs a, const A* pw, const A* pb,
                                                                 int split) {
  __shared__ A sw[kParamLanes][kParamCols + 1];
  __shared__ A sb[kParamLanes][kParamCols + 1];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kParamCols + threadIdx.x;
  A accw = A(0), accb = A(0);
  if (c < a.n) {
    for (int k = threadIdx.y; k < split; k += kParamLanes) {
      accw += pw[k * a.n + c];
      accb += pb[k * a.n + c];
    }
  }
  sw[threadIdx.y][threadIdx.x] = accw;
  sb[threadIdx.y][threadIdx.x] = accb;
  __syncthreads();
  if (threadIdx.y == 0 && c < a.n) {
    A w = A(0), b = A(0);
    for (int k = 0; k < kParamLanes; ++k) {
      w += sw[k][threadIdx.x];
      b += sb[k][threadIdx.x];
    }
    if (a.dweight) store_from<A>(a.dweight, a.dweight_dtype, c, w);
    if (a.dbias) store_from<A>(a.dbias, a.dbias_dtype, c, b);
  }
}

template <typename T>
int launch_backward(const NormBackwardArgs& a, cudaStream_t s) {
  using A = typename AccOf<T>::type;
  int threads = 32;
  while (threads < 256 && threads < a.n) threads <<= 1;
  const int64_t cap = int64_t(1) << 20;
  if (a.rows) norm_dx_kernel<T><<<static_cast<unsigned>(a.rows < cap ? a.rows : cap), threads, 0, s>>>(a);
  if (a.dweight || a.dbias) {
    // gridDim.x = ceil(n / 32) stays far below its 2^31 - 1 limit for any
    // parameter that fits in memory; gridDim.y = split <= kSplitMax.
    const int64_t tiles = (a.n + kParamCols - 1) / kParamCols;
    const int64_t split = reduce_split(tiles, a.n, a.rows, int64_t(kParamLanes) * kMinRowsPerLane, 2 * sizeof(A),
                                       a.workspace_bytes);
    const int64_t chunk = split > 1 ? (a.rows + split - 1) / split : a.rows;
    A* pw = split > 1 ? static_cast<A*>(a.workspace) : nullptr;
    A* pb = split > 1 ? pw + split * a.n : nullptr;
    norm_dparams_kernel<T><<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(split)),
                             dim3(kParamCols, kParamLanes), 0, s>>>(a, chunk, pw, pb);
    if (split > 1)
      norm_dparams_finish_kernel<A><<<static_cast<unsigned>(tiles), dim3(kParamCols, kParamLanes), 0, s>>>(
          a, pw, pb, static_cast<int>(split));
  }
  return cudaGetLastError();
}

}  // namespace

int norm_launch(const NormArgs& a, void* stream) {
  if (a.rows == 0) return cudaSuccess;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case kF32: return launch<float>(a, s);
    case kF16: return launch<__half>(a, s);
    case kBF16: return launch<__nv_bfloat16>(a, s);
    default: return launch<double>(a, s);
  }
}

int norm_backward_launch(const NormBackwardArgs& a, void* stream) {
  if (a.n == 0) return cudaSuccess;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case kF32: return launch_backward<float>(a, s);
    case kF16: return launch_backward<__half>(a, s);
    case kBF16: return launch_backward<__nv_bfloat16>(a, s);
    default: return launch_backward<double>(a, s);
  }
}

}  // namespace ops
}  // namespace cutegrad
