// Fused multi-tensor optimizer steps (AdamW, SGD with momentum/Nesterov) and
// the global gradient norm for clipping, without a host sync.
//
// Design: one launch updates up to 48 tensors.  The host splits every
// tensor into chunks of `chunk` elements and passes, per tensor, its pointers,
// size and first block; block b finds its tensor by a short search over the
// prefix sums (count <= 48) and updates its chunk with one thread per element
// (grid-stride inside the chunk), reading and writing every operand once.
// All hyper-parameters stay fp64 on the host and fp32 in the kernel; the step
// count may live on the device (step_ptr) so a captured CUDA graph applies
// the right bias correction on every replay; the gradient may be scaled by a
// device scalar (the clipping coefficient), so clipping + step need no sync.
//
// The gradient norm is two launches: each block writes the sum of squares of
// its chunk to its own slot (fixed order, no atomics: the same bits every
// run), then one block folds the slots and writes (norm, clip coefficient).
//
// AOT specializations: parameter/state dtype fp32, fp16, bf16 (runtime switch
// on the gradient dtype through the generic loads).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "block_reduce.h"
#include "dtype_access.h"
#include "ops_args.h"

namespace cutegrad {
namespace ops {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ int tensor_of(const MultiTensorArgs& a, int64_t block) {
  int t = 0;
  while (t + 1 < a.count && a.block_start[t + 1] <= block) ++t;
  return t;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) adamw_kernel(const MultiTensorArgs a, const AdamWHyper h) {
  const int t = tensor_of(a, blockIdx.x);
  const int64_t begin = (static_cast<int64_t>(blockIdx.x) - a.block_start[t]) * a.chunk;
  int64_t end = begin + a.chunk;
  if (end > a.numel[t]) end = a.numel[t];
  T* p = static_cast<T*>(a.param[t]);
  T* m = static_cast<T*>(a.state0[t]);
  T* v = static_cast<T*>(a.state1[t]);
  const float step = h.step_ptr ? *h.step_ptr : static_cast<float>(h.step);
  const float b1 = static_cast<float>(h.beta1), b2 = static_cast<float>(h.beta2);
  const float bc1 = 1.0f - powf(b1, step);
  const float bc2_sqrt = sqrtf(1.0f - powf(b2, step));
  const float lr = static_cast<float>(h.lr);
  const float decay = 1.0f - lr * static_cast<float>(h.weight_decay);
  const float eps = static_cast<float>(h.eps);
  const float scale = (h.grad_scale ? *h.grad_scale : 1.0f) * (h.maximize ? -1.0f : 1.0f);
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const float g = load_as<float>(a.grad[t], a.grad_dtype, i) * scale;
    float pi = widen(p[i]) * decay;
    float mi = widen(m[i]);
    mi += (g - mi) * (1.0f - b1);
    const float vi = widen(v[i]) * b2 + g * g * (1.0f - b2);
    pi -= (lr / bc1) * (mi / (sqrtf(vi) / bc2_sqrt + eps));
    p[i] = narrow<T>(pi);
    m[i] = narrow<T>(mi);
    v[i] = narrow<T>(vi);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sgd_kernel(const MultiTensorArgs a, const SGDHyper h) {
  const int t = tensor_of(a, blockIdx.x);
  const int64_t begin = (static_cast<int64_t>(blockIdx.x) - a.block_start[t]) * a.chunk;
  int64_t end = begin + a.chunk;
  if (end > a.numel[t]) end = a.numel[t];
  T* p = static_cast<T*>(a.param[t]);
  T* buf = static_cast<T*>(a.state0[t]);
  const float lr = static_cast<float>(h.lr), mom = static_cast<float>(h.momentum);
  const float damp = static_cast<float>(h.dampening), wd = static_cast<float>(h.weight_decay);
  const float scale = (h.grad_scale ? *h.grad_scale : 1.0f) * (h.maximize ? -1.0f : 1.0f);
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const float pi = widen(p[i]);
    float g = load_as<float>(a.grad[t], a.grad_dtype, i) * scale + wd * pi;
    if (buf) {
      const float b = h.first_step ? g : mom * widen(buf[i]) + (1.0f - damp) * g;
      buf[i] = narrow<T>(b);
      g = h.nesterov ? g + mom * b : b;
    }
    p[i] = narrow<T>(pi - lr * g);
  }
}

__global__ void __launch_bounds__(kThreads) sum_squares_kernel(const MultiTensorArgs a, float* partial) {
  __shared__ float scratch[kThreads / 32];
  const int t = tensor_of(a, blockIdx.x);
  const int64_t begin = (static_cast<int64_t>(blockIdx.x) - a.block_start[t]) * a.chunk;
  int64_t end = begin + a.chunk;
  if (end > a.numel[t]) end = a.numel[t];
  float s = 0.0f;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const float g = load_as<float>(a.grad[t], a.grad_dtype, i);
    s += g * g;
  }
  s = block_reduce(s, SumOf(), scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

__global__ void __launch_bounds__(kThreads) norm_finish_kernel(const float* partial, int64_t n, float* out,
                                                               float max_norm) {
  __shared__ double scratch[kThreads / 32];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) s += partial[i];
  s = block_reduce(s, SumOf(), scratch);
  if (threadIdx.x == 0) {
    const float norm = static_cast<float>(sqrt(s));
    const float coef = max_norm / (norm + 1e-6f);
    out[0] = norm;
    out[1] = coef < 1.0f ? coef : 1.0f;
  }
}

template <template <typename> class K, typename H>
int launch_typed(const MultiTensorArgs& a, const H& h, cudaStream_t s) {
  const int64_t blocks = a.block_start[a.count];
  if (blocks == 0) return cudaSuccess;
  switch (a.param_dtype) {
    case kF32: K<float>::launch(a, h, blocks, s); break;
    case kF16: K<__half>::launch(a, h, blocks, s); break;
    default: K<__nv_bfloat16>::launch(a, h, blocks, s); break;
  }
  return cudaGetLastError();
}

template <typename T> struct AdamWLaunch {
  static void launch(const MultiTensorArgs& a, const AdamWHyper& h, int64_t blocks, cudaStream_t s) {
    adamw_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(a, h);
  }
};
template <typename T> struct SGDLaunch {
  static void launch(const MultiTensorArgs& a, const SGDHyper& h, int64_t blocks, cudaStream_t s) {
    sgd_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(a, h);
  }
};

}  // namespace

int adamw_launch(const MultiTensorArgs& a, const AdamWHyper& h, void* stream) {
  return launch_typed<AdamWLaunch>(a, h, static_cast<cudaStream_t>(stream));
}

int sgd_launch(const MultiTensorArgs& a, const SGDHyper& h, void* stream) {
  return launch_typed<SGDLaunch>(a, h, static_cast<cudaStream_t>(stream));
}

int sum_squares_launch(const MultiTensorArgs& a, float* partial, void* stream) {
  const int64_t blocks = a.block_start[a.count];
  if (blocks == 0) return cudaSuccess;
  sum_squares_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(a, partial);
  return cudaGetLastError();
}

int norm_finish_launch(const float* partial, int64_t n, float* out, double max_norm, void* stream) {
  norm_finish_kernel<<<1, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(partial, n, out,
                                                                           static_cast<float>(max_norm));
  return cudaGetLastError();
}

}  // namespace ops
}  // namespace cutegrad
