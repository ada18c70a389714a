// SIMT GEMM fallback: correct for every shape, stride and dtype the CuTeDSL
// kernels cannot take (extents below a tile, strides or pointers that break
// TMA's 16-byte rule, GPUs other than sm_90, fp32 inputs, epilogue and
// accumulate combinations without an AOT specialization).
//
// Design: 64x64 output tile per 256-thread block, each thread a 4x4 register
// block; A and B K-slices of 16 staged through shared memory as fp32 (so the
// arithmetic is fp32 FMA for every input dtype).  Loads use the general
// strides and are bounds-checked, so nothing needs padding.  The epilogue is
// the same as the tensor-core kernel's: (+ D) (+ bias[n]) (GELU-tanh) or
// (* gelu'(pre-activation)).  Speed is not the goal here.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "gemm_args.h"

namespace cutegrad {
namespace {

constexpr int kTile = 64;
constexpr int kSlice = 16;
constexpr float kGeluK0 = 0.7978845608028654f;  // sqrt(2/pi)
constexpr float kGeluK1 = 0.044715f;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename TIn, typename TOut>
__global__ void __launch_bounds__(256) gemm_simt_kernel(GemmArgs g) {
  __shared__ float sA[kSlice][kTile + 1];
  __shared__ float sB[kSlice][kTile + 1];
  const TIn* A = static_cast<const TIn*>(g.a) + blockIdx.z * g.a_sl;
  const TIn* B = static_cast<const TIn*>(g.b) + blockIdx.z * g.b_sl;
  TOut* D = static_cast<TOut*>(g.d) + blockIdx.z * g.d_sl;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[4][4] = {};

  for (int64_t k0 = 0; k0 < g.k; k0 += kSlice) {
    for (int i = threadIdx.x; i < kSlice * kTile; i += 256) {
      int kk = i / kTile, rr = i % kTile;
      int64_t m = m0 + rr, n = n0 + rr, k = k0 + kk;
      sA[kk][rr] = (m < g.m && k < g.k) ? to_f32(A[m * g.a_sm + k * g.a_sk]) : 0.f;
      sB[kk][rr] = (n < g.n && k < g.k) ? to_f32(B[k * g.b_sk + n * g.b_sn]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kSlice; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = sA[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = sB[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }

  const TOut* bias = static_cast<const TOut*>(g.bias);
  const TOut* aux = g.aux ? static_cast<const TOut*>(g.aux) + blockIdx.z * g.aux_sl : nullptr;
  const bool add_bias = g.epilogue == Epilogue::bias || g.epilogue == Epilogue::bias_gelu;
  const bool gelu = g.epilogue == Epilogue::gelu || g.epilogue == Epilogue::bias_gelu;
  const bool gelu_bwd = g.epilogue == Epilogue::gelu_bwd;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    int64_t m = m0 + ty + 16 * i;
    if (m >= g.m) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      int64_t n = n0 + tx + 16 * j;
      if (n >= g.n) continue;
      float v = acc[i][j];
      if (g.accumulate) v += to_f32(D[m * g.d_sm + n]);
      if (add_bias) v += to_f32(bias[n]);
      if (gelu) v = 0.5f * v * (1.f + tanhf(kGeluK0 * (v + kGeluK1 * v * v * v)));
      if (gelu_bwd) {
        float x = to_f32(aux[m * g.aux_sm + n]);
        float t = tanhf(kGeluK0 * (x + kGeluK1 * x * x * x));
        v *= 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * kGeluK0 * (1.f + 3.f * kGeluK1 * x * x);
      }
      D[m * g.d_sm + n] = from_f32<TOut>(v);
    }
  }
}

template <typename TIn>
cudaError_t launch_for_input(const GemmArgs& g, cudaStream_t stream) {
  dim3 grid(static_cast<unsigned>((g.n + kTile - 1) / kTile), static_cast<unsigned>((g.m + kTile - 1) / kTile),
            static_cast<unsigned>(g.batch));
  switch (g.out_dtype) {
    case DType::bf16: gemm_simt_kernel<TIn, __nv_bfloat16><<<grid, 256, 0, stream>>>(g); break;
    case DType::fp16: gemm_simt_kernel<TIn, __half><<<grid, 256, 0, stream>>>(g); break;
    case DType::fp32: gemm_simt_kernel<TIn, float><<<grid, 256, 0, stream>>>(g); break;
  }
  return cudaGetLastError();
}

}  // namespace

int gemm_fallback_launch(const GemmArgs& g, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (g.in_dtype) {
    case DType::bf16: return launch_for_input<__nv_bfloat16>(g, s);
    case DType::fp16: return launch_for_input<__half>(g, s);
    case DType::fp32: return launch_for_input<float>(g, s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cutegrad
