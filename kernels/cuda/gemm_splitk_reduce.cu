// Split-K reduction: D = epilogue(sum over s of P[s] (+ D)), where P holds the
// fp32 partial products of `splits` K-slices (row stride ws_ld, slice stride
// ws_ld * M).  Used when a GEMM has too few output tiles to fill the GPU (weight
// gradients: small M x N, long K); the slices run as a batched GEMM first.
// Memory-bound: float4 loads along N, coalesced across a warp.  Same epilogue as the GEMM kernels.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "gemm_args.h"

namespace cutegrad {
namespace {

constexpr float kGeluK0 = 0.7978845608028654f;
constexpr float kGeluK1 = 0.044715f;

__device__ __forceinline__ float load_f32(const float* p) { return *p; }
__device__ __forceinline__ float load_f32(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_f32(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store_f32(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_f32(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_f32(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

template <typename TOut>
__device__ __forceinline__ float epilogue(const GemmArgs& g, float v, int64_t m, int64_t n) {
  TOut* out = static_cast<TOut*>(g.d) + m * g.d_sm + n;
  if (g.accumulate) v += load_f32(out);
  // Only the aux-reading epilogues form this address (aux is null otherwise).
  auto aux = [&] { return static_cast<TOut*>(const_cast<void*>(g.aux)) + m * g.aux_sm + n; };
  if (epilogue_adds_bias(g.epilogue)) v += load_f32(static_cast<const TOut*>(g.bias) + n);
  if (g.epilogue == Epilogue::bias_gelu_aux) {
    store_f32(aux(), v);  // the pre-activation, rounded; GELU then reads the rounded value
    v = load_f32(aux());
  }
  if (epilogue_applies_gelu(g.epilogue)) v = 0.5f * v * (1.f + tanhf(kGeluK0 * (v + kGeluK1 * v * v * v)));
  if (g.epilogue == Epilogue::gelu_bwd) {
    float x = load_f32(aux());
    float t = tanhf(kGeluK0 * (x + kGeluK1 * x * x * x));
    v *= 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * kGeluK0 * (1.f + 3.f * kGeluK1 * x * x);
  }
  if (epilogue_adds_residual(g.epilogue)) v += load_f32(aux());
  return v;
}

// Each thread owns 4 consecutive columns (one float4 per slice: ws rows are
// padded to a multiple of 8 floats and 16-byte aligned) of rows
// blockIdx.y * 4 + threadIdx.y, stepping over the rows by the grid height.
template <typename TOut>
__global__ void __launch_bounds__(256) splitk_reduce_kernel(GemmArgs g, const float* ws, int64_t ws_ld, int splits) {
  const int64_t n0 = 4 * (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x);
  if (n0 >= g.n) return;
  const int64_t slice = ws_ld * g.m;
  for (int64_t m = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; m < g.m;
       m += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    const float* p = ws + m * ws_ld + n0;
    float4 acc = *reinterpret_cast<const float4*>(p);
    for (int s = 1; s < splits; ++s) {
      float4 v = *reinterpret_cast<const float4*>(p + s * slice);
      acc.x += v.x, acc.y += v.y, acc.z += v.z, acc.w += v.w;
    }
    const float vals[4] = {acc.x, acc.y, acc.z, acc.w};
    TOut* out = static_cast<TOut*>(g.d) + m * g.d_sm;
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (n0 + j < g.n) store_f32(out + n0 + j, epilogue<TOut>(g, vals[j], m, n0 + j));
  }
}

}  // namespace

int gemm_splitk_reduce(const GemmArgs& g, const float* ws, int64_t ws_ld, int splits, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const dim3 block(64, 4);
  const dim3 grid(static_cast<unsigned>((g.n + 255) / 256), static_cast<unsigned>(std::min<int64_t>((g.m + 3) / 4, 65535)));
  switch (g.out_dtype) {
    case DType::bf16: splitk_reduce_kernel<__nv_bfloat16><<<grid, block, 0, s>>>(g, ws, ws_ld, splits); break;
    case DType::fp16: splitk_reduce_kernel<__half><<<grid, block, 0, s>>>(g, ws, ws_ld, splits); break;
    case DType::fp32: splitk_reduce_kernel<float><<<grid, block, 0, s>>>(g, ws, ws_ld, splits); break;
  }
  return cudaGetLastError();
}

}  // namespace cutegrad
