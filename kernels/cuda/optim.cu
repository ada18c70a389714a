// Fused multi-tensor optimizer steps (Adam/AdamW, SGD with momentum/Nesterov),
// the global gradient norm for clipping and the in-place scale of every
// gradient by a device scalar, none of which needs a host sync.
//
// Design: one launch updates up to 48 tensors.  The host splits every
// tensor into chunks of `chunk` elements and passes, per tensor, its pointers,
// size and first block; block b finds its tensor by a short search over the
// prefix sums (count <= 48) and updates its chunk with one thread per element
// (grid-stride inside the chunk), reading and writing every operand once.
// All hyper-parameters stay fp64 on the host and fp32 in the kernel.  What a
// captured CUDA graph must see change between replays lives on the device:
// - the Adam step count, one fp32 counter per tensor (MultiTensorArgs::step),
//   incremented by a one-block launch queued before the update, so every
//   block of the update reads the new count (an increment inside the update
//   would race with blocks of the same tensor still reading it);
// - the learning rate (lr_ptr), which a schedule fills between replays;
// - the gradient scale (grad_scale, the clipping coefficient), so clipping +
//   step need no sync.
// multi-tensor scale (clip_grad_norm_ without an optimizer) multiplies every
// tensor in place by one device scalar, chunked like the updates.
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
  const float step = a.step[t] ? *a.step[t] : static_cast<float>(h.step);
  const float b1 = static_cast<float>(h.beta1), b2 = static_cast<float>(h.beta2);
  const float bc1 = 1.0f - powf(b1, step);
  const float bc2_sqrt = sqrtf(1.0f - powf(b2, step));
  const float lr = h.lr_ptr ? *h.lr_ptr : static_cast<float>(h.lr);
  const float wd = static_cast<float>(h.weight_decay);
  const float decay = h.decoupled ? 1.0f - lr * wd : 1.0f;
  const float coupled_wd = h.decoupled ? 0.0f : wd;
  const float eps = static_cast<float>(h.eps);
  const float scale = (h.grad_scale ? *h.grad_scale : 1.0f) * (h.maximize ? -1.0f : 1.0f);
  void* shadow = a.shadow[t];
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const float p0 = widen(p[i]);
    const float g = load_as<float>(a.grad[t], a.grad_dtype, i) * scale + coupled_wd * p0;
    float pi = p0 * decay;
    float mi = widen(m[i]);
    mi += (g - mi) * (1.0f - b1);
    const float vi = widen(v[i]) * b2 + g * g * (1.0f - b2);
    pi -= (lr / bc1) * (mi / (sqrtf(vi) / bc2_sqrt + eps));
    p[i] = narrow<T>(pi);
    m[i] = narrow<T>(mi);
    v[i] = narrow<T>(vi);
    if (shadow) store_from<float>(shadow, a.shadow_dtype, i, pi);
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
  const float lr = h.lr_ptr ? *h.lr_ptr : static_cast<float>(h.lr);
  const float mom = static_cast<float>(h.momentum);
  const float damp = static_cast<float>(h.dampening), wd = static_cast<float>(h.weight_decay);
  const float scale = (h.grad_scale ? *h.grad_scale : 1.0f) * (h.maximize ? -1.0f : 1.0f);
  void* shadow = a.shadow[t];
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const float pi = widen(p[i]);
    float g = load_as<float>(a.grad[t], a.grad_dtype, i) * scale + wd * pi;
    if (buf) {
      const float b = h.first_step ? g : mom * widen(buf[i]) + (1.0f - damp) * g;
      buf[i] = narrow<T>(b);
      g = h.nesterov ? g + mom * b : b;
    }
    p[i] = narrow<T>(pi - lr * g);
    if (shadow) store_from<float>(shadow, a.shadow_dtype, i, pi - lr * g);
  }
}

__global__ void step_increment_kernel(const MultiTensorArgs a) {
  const int t = threadIdx.x;
  if (t < a.count && a.step[t]) *a.step[t] += 1.0f;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) scale_kernel(const MultiTensorArgs a, const float* scale) {
  const int t = tensor_of(a, blockIdx.x);
  const int64_t begin = (static_cast<int64_t>(blockIdx.x) - a.block_start[t]) * a.chunk;
  int64_t end = begin + a.chunk;
  if (end > a.numel[t]) end = a.numel[t];
  T* x = static_cast<T*>(a.param[t]);
  const float s = *scale;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) x[i] = narrow<T>(widen(x[i]) * s);
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
    // NaN stays NaN (a NaN gradient poisons every gradient, as torch's clamp does).
    out[1] = coef > 1.0f ? 1.0f : coef;
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

template <typename T> struct ScaleLaunch {
  static void launch(const MultiTensorArgs& a, const float* scale, int64_t blocks, cudaStream_t s) {
    scale_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(a, scale);
  }
};

}  // namespace

int step_increment_launch(const MultiTensorArgs& a, void* stream) {
  if (a.count == 0) return cudaSuccess;
  step_increment_kernel<<<1, kMaxTensorsPerLaunch, 0, static_cast<cudaStream_t>(stream)>>>(a);
  return cudaGetLastError();
}

int scale_launch(const MultiTensorArgs& a, const float* scale, void* stream) {
  return launch_typed<ScaleLaunch>(a, scale, static_cast<cudaStream_t>(stream));
}

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
