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
// AOT specializations: fp32, fp16, bf16, fp64 inputs.
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

}  // namespace ops
}  // namespace cutegrad
