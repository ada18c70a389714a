// softmax / log_softmax along one dimension of a contiguous tensor viewed as
// (outer, n, inner), its causal variant over the last dimension, and the fused
// backward of both.
//
// Design:
//  * inner == 1 (the last dimension, the common case): one block per row,
//    32..256 threads by row length.  Three passes over the row, all
//    coalesced: max, sum of exp(x - max), then the write; the row is re-read
//    from L2/L1 instead of being held in registers, so any length works.
//  * inner > 1: one thread per (outer, inner) column walks the n elements
//    with stride inner; neighbouring threads read neighbouring addresses.
//  * causal (inner == 1 only, a (..., L, n) input): row r is query
//    i = r mod L and keeps columns j <= i (the top-left aligned tril of the
//    (L, n) matrix, as torch's is_causal); the rest are -inf without being
//    read: written as 0 (softmax) or -inf (log_softmax).  Every row keeps
//    column 0, so no row is empty.  Attention builds no mask tensor.
//  * backward: dx = y * (dy - sum(dy * y)) (softmax) or
//    dx = dy - exp(y) * sum(dy) (log_softmax), the same row/column split, one
//    block reduction per row (fixed order, so graphed and eager steps agree
//    bit for bit).
// The max is taken as 0 when it is not finite (as the CPU reference does), so
// rows of -inf give NaN/-inf exactly as there.  Accumulation in fp32 (fp64
// for fp64), one rounding at the store.
//
// AOT specializations: fp32, fp16, bf16, fp64 for each of the four kernels
// (forward rows/columns, backward rows/columns).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "block_reduce.h"
#include "dtype_access.h"
#include "ops_args.h"

namespace cutegrad {
namespace ops {
namespace {

template <typename A> __device__ __forceinline__ A finite_or_zero(A m) {
  return (m_isnan(m) || m_fabs(m) == m_inf<A>()) ? A(0) : m;
}

template <typename T>
__global__ void __launch_bounds__(256) softmax_rows_kernel(const SoftmaxArgs a) {
  using A = typename AccOf<T>::type;
  __shared__ A scratch[8];
  const T* x0 = static_cast<const T*>(a.x);
  T* y0 = static_cast<T*>(a.y);
  for (int64_t row = blockIdx.x; row < a.outer; row += gridDim.x) {
    const T* x = x0 + row * a.n;
    T* y = y0 + row * a.n;
    // columns [0, valid) take part; the causal tail is -inf
    const int64_t valid = a.causal_rows > 0 ? (row % a.causal_rows + 1 < a.n ? row % a.causal_rows + 1 : a.n) : a.n;
    A m = -m_inf<A>();
    for (int64_t i = threadIdx.x; i < valid; i += blockDim.x) m = MaxOf()(m, widen(x[i]));
    m = finite_or_zero(block_reduce(m, MaxOf(), scratch));
    A s = A(0);
    for (int64_t i = threadIdx.x; i < valid; i += blockDim.x) s += m_exp(widen(x[i]) - m);
    s = block_reduce(s, SumOf(), scratch);
    if (a.log) {
      const A ls = m_log(s);
      for (int64_t i = threadIdx.x; i < valid; i += blockDim.x) y[i] = narrow<T>((widen(x[i]) - m) - ls);
    } else {
      for (int64_t i = threadIdx.x; i < valid; i += blockDim.x) y[i] = narrow<T>(m_exp(widen(x[i]) - m) / s);
    }
    const T tail = narrow<T>(a.log ? -m_inf<A>() : A(0));
    for (int64_t i = valid + threadIdx.x; i < a.n; i += blockDim.x) y[i] = tail;
  }
}

template <typename T>
__global__ void __launch_bounds__(256) softmax_columns_kernel(const SoftmaxArgs a) {
  using A = typename AccOf<T>::type;
  const T* x0 = static_cast<const T*>(a.x);
  T* y0 = static_cast<T*>(a.y);
  const int64_t cols = a.outer * a.inner;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < cols;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t base = (c / a.inner) * a.n * a.inner + c % a.inner;
    const T* x = x0 + base;
    T* y = y0 + base;
    A m = -m_inf<A>();
    for (int64_t i = 0; i < a.n; ++i) m = MaxOf()(m, widen(x[i * a.inner]));
    m = finite_or_zero(m);
    A s = A(0);
    for (int64_t i = 0; i < a.n; ++i) s += m_exp(widen(x[i * a.inner]) - m);
    if (a.log) {
      const A ls = m_log(s);
      for (int64_t i = 0; i < a.n; ++i) y[i * a.inner] = narrow<T>((widen(x[i * a.inner]) - m) - ls);
    } else {
      for (int64_t i = 0; i < a.n; ++i) y[i * a.inner] = narrow<T>(m_exp(widen(x[i * a.inner]) - m) / s);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(256) softmax_backward_rows_kernel(const SoftmaxBackwardArgs a) {
  using A = typename AccOf<T>::type;
  __shared__ A scratch[8];
  const T* y0 = static_cast<const T*>(a.y);
  const T* dy0 = static_cast<const T*>(a.dy);
  T* dx0 = static_cast<T*>(a.dx);
  for (int64_t row = blockIdx.x; row < a.outer; row += gridDim.x) {
    const T* y = y0 + row * a.n;
    const T* dy = dy0 + row * a.n;
    T* dx = dx0 + row * a.n;
    A s = A(0);
    if (a.log) {
      for (int64_t i = threadIdx.x; i < a.n; i += blockDim.x) s += widen(dy[i]);
    } else {
      for (int64_t i = threadIdx.x; i < a.n; i += blockDim.x) s += widen(dy[i]) * widen(y[i]);
    }
    s = block_reduce(s, SumOf(), scratch);
    if (a.log) {
      for (int64_t i = threadIdx.x; i < a.n; i += blockDim.x) dx[i] = narrow<T>(widen(dy[i]) - m_exp(widen(y[i])) * s);
    } else {
      for (int64_t i = threadIdx.x; i < a.n; i += blockDim.x) dx[i] = narrow<T>(widen(y[i]) * (widen(dy[i]) - s));
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(256) softmax_backward_columns_kernel(const SoftmaxBackwardArgs a) {
  using A = typename AccOf<T>::type;
  const T* y0 = static_cast<const T*>(a.y);
  const T* dy0 = static_cast<const T*>(a.dy);
  T* dx0 = static_cast<T*>(a.dx);
  const int64_t cols = a.outer * a.inner;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < cols;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t base = (c / a.inner) * a.n * a.inner + c % a.inner;
    const T* y = y0 + base;
    const T* dy = dy0 + base;
    T* dx = dx0 + base;
    A s = A(0);
    if (a.log) {
      for (int64_t i = 0; i < a.n; ++i) s += widen(dy[i * a.inner]);
      for (int64_t i = 0; i < a.n; ++i)
        dx[i * a.inner] = narrow<T>(widen(dy[i * a.inner]) - m_exp(widen(y[i * a.inner])) * s);
    } else {
      for (int64_t i = 0; i < a.n; ++i) s += widen(dy[i * a.inner]) * widen(y[i * a.inner]);
      for (int64_t i = 0; i < a.n; ++i)
        dx[i * a.inner] = narrow<T>(widen(y[i * a.inner]) * (widen(dy[i * a.inner]) - s));
    }
  }
}

unsigned capped(int64_t blocks) {
  const int64_t cap = int64_t(1) << 20;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks < cap ? blocks : cap));
}

template <typename T>
int launch(const SoftmaxArgs& a, cudaStream_t s) {
  if (a.inner == 1) {
    int threads = 32;
    while (threads < 256 && threads < a.n) threads <<= 1;
    softmax_rows_kernel<T><<<capped(a.outer), threads, 0, s>>>(a);
  } else {
    softmax_columns_kernel<T><<<capped((a.outer * a.inner + 255) / 256), 256, 0, s>>>(a);
  }
  return cudaGetLastError();
}

template <typename T>
int launch_backward(const SoftmaxBackwardArgs& a, cudaStream_t s) {
  if (a.inner == 1) {
    int threads = 32;
    while (threads < 256 && threads < a.n) threads <<= 1;
    softmax_backward_rows_kernel<T><<<capped(a.outer), threads, 0, s>>>(a);
  } else {
    softmax_backward_columns_kernel<T><<<capped((a.outer * a.inner + 255) / 256), 256, 0, s>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace

int softmax_backward_launch(const SoftmaxBackwardArgs& a, void* stream) {
  if (a.outer == 0 || a.n == 0 || a.inner == 0) return cudaSuccess;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case kF32: return launch_backward<float>(a, s);
    case kF16: return launch_backward<__half>(a, s);
    case kBF16: return launch_backward<__nv_bfloat16>(a, s);
    default: return launch_backward<double>(a, s);
  }
}

int softmax_launch(const SoftmaxArgs& a, void* stream) {
  if (a.outer == 0 || a.n == 0 || a.inner == 0) return cudaSuccess;
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
