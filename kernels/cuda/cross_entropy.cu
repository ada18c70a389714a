// Cross-entropy fused with log_softmax, forward and backward, with
// ignore_index and label smoothing (torch.nn.functional.cross_entropy's
// definition), over contiguous (rows, classes) logits.
//
// Design: one block per row (32..256 threads by class count), fp32
// accumulation.  Forward: one pass for the row maximum, one for
// sum(exp(x - max)) and sum(x) together, then one thread writes the row loss
// lse - (1 - ls) x[t] - ls * mean(x) and the row's lse (kept for the
// backward).  Backward: one pass, grad = g * (exp(x - lse) - (1 - ls)[j == t]
// - ls / classes), so the logits are read twice in the forward and once in
// the backward and no (rows, classes) probability tensor is ever stored.
// Ignored rows get loss 0 and gradient 0; the mean over the rows that count
// is the caller's (one reduction).  A target outside [0, classes) on a row
// that is not ignored gives a NaN loss and is reported to the device's index
// error record (index_errors.h), so the host raises IndexError at its next
// wait without a sync here.
//
// AOT specializations: logits fp32, fp16, bf16.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "block_reduce.h"
#include "dtype_access.h"
#include "index_errors.h"
#include "ops_args.h"

namespace cutegrad {
namespace ops {
namespace {

constexpr int kCrossEntropyOp = 6;  // frontend/cuda/index_errors.py: CROSS_ENTROPY

template <typename T>
__global__ void __launch_bounds__(256) ce_forward_kernel(const CrossEntropyArgs a) {
  __shared__ float scratch[8];
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(a.logits) + row * a.classes;
    const int64_t t = a.target[row];
    float m = -m_inf<float>();
    for (int64_t j = threadIdx.x; j < a.classes; j += blockDim.x) m = MaxOf()(m, widen(x[j]));
    m = block_reduce(m, MaxOf(), scratch);
    const float shift = (m_isnan(m) || m_fabs(m) == m_inf<float>()) ? 0.0f : m;
    float se = 0.0f, sx = 0.0f;
    for (int64_t j = threadIdx.x; j < a.classes; j += blockDim.x) {
      const float v = widen(x[j]);
      se += expf(v - shift);
      sx += v;
    }
    se = block_reduce(se, SumOf(), scratch);
    sx = block_reduce(sx, SumOf(), scratch);
    if (threadIdx.x == 0) {
      const float lse = logf(se) + shift;
      a.lse[row] = lse;
      if (t == a.ignore_index) {
        a.loss[row] = 0.0f;
      } else if (t < 0 || t >= a.classes) {
        a.loss[row] = __int_as_float(0x7fc00000);
        report_bad_index(a.error, kCrossEntropyOp, 1, t, a.classes);
      } else {
        const float ls = static_cast<float>(a.label_smoothing);
        a.loss[row] = lse - (1.0f - ls) * widen(x[t]) - ls * (sx / static_cast<float>(a.classes));
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(256) ce_backward_kernel(const CrossEntropyArgs a) {
  const float ls = static_cast<float>(a.label_smoothing);
  const float smooth = ls / static_cast<float>(a.classes);
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(a.logits) + row * a.classes;
    T* gx = static_cast<T*>(a.grad_logits) + row * a.classes;
    const int64_t t = a.target[row];
    const bool ignored = t == a.ignore_index;
    const float g = a.grad_rows[row];
    const float lse = a.lse[row];
    for (int64_t j = threadIdx.x; j < a.classes; j += blockDim.x) {
      float v = 0.0f;
      if (!ignored) v = g * (expf(widen(x[j]) - lse) - (j == t ? 1.0f - ls : 0.0f) - smooth);
      gx[j] = narrow<T>(v);
    }
  }
}

template <typename T>
int launch(const CrossEntropyArgs& a, bool backward, cudaStream_t s) {
  int threads = 32;
  while (threads < 256 && threads < a.classes) threads <<= 1;
  const int64_t cap = int64_t(1) << 20;
  const unsigned blocks = static_cast<unsigned>(a.rows < cap ? a.rows : cap);
  if (backward) ce_backward_kernel<T><<<blocks, threads, 0, s>>>(a);
  else ce_forward_kernel<T><<<blocks, threads, 0, s>>>(a);
  return cudaGetLastError();
}

int dispatch(const CrossEntropyArgs& a, bool backward, void* stream) {
  if (a.rows == 0) return cudaSuccess;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case kF32: return launch<float>(a, backward, s);
    case kF16: return launch<__half>(a, backward, s);
    default: return launch<__nv_bfloat16>(a, backward, s);
  }
}

}  // namespace

int cross_entropy_forward_launch(const CrossEntropyArgs& a, void* stream) { return dispatch(a, false, stream); }
int cross_entropy_backward_launch(const CrossEntropyArgs& a, void* stream) { return dispatch(a, true, stream); }

}  // namespace ops
}  // namespace cutegrad
