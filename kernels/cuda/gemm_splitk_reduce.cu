// Split-K reduction: D = epilogue(sum over s of P[s] (+ D)), where P holds the
// fp32 partial products of `splits` K-slices (row stride ws_ld, slice stride
// ws_ld * M).  Used when a GEMM has too few output tiles to fill the GPU (weight
// gradients: small M x N, long K); the slices run as a batched GEMM first.
// Memory-bound: one thread per output element, consecutive threads along N so
// every slice is read with coalesced loads.  Same epilogue as the GEMM kernels.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

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
__global__ void splitk_reduce_kernel(GemmArgs g, const float* ws, int64_t ws_ld, int splits) {
  const int64_t total = g.m * g.n;
  const int64_t slice = ws_ld * g.m;
  TOut* D = static_cast<TOut*>(g.d);
  const TOut* bias = static_cast<const TOut*>(g.bias);
  const TOut* aux = static_cast<const TOut*>(g.aux);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / g.n, n = i % g.n;
    float v = 0.f;
    for (int s = 0; s < splits; ++s) v += ws[s * slice + m * ws_ld + n];
    TOut* out = D + m * g.d_sm + n;
    if (g.accumulate) v += load_f32(out);
    if (g.epilogue == Epilogue::bias || g.epilogue == Epilogue::bias_gelu) v += load_f32(bias + n);
    if (g.epilogue == Epilogue::gelu || g.epilogue == Epilogue::bias_gelu)
      v = 0.5f * v * (1.f + tanhf(kGeluK0 * (v + kGeluK1 * v * v * v)));
    if (g.epilogue == Epilogue::gelu_bwd) {
      float x = load_f32(aux + m * g.aux_sm + n);
      float t = tanhf(kGeluK0 * (x + kGeluK1 * x * x * x));
      v *= 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * kGeluK0 * (1.f + 3.f * kGeluK1 * x * x);
    }
    store_f32(out, v);
  }
}

}  // namespace

int gemm_splitk_reduce(const GemmArgs& g, const float* ws, int64_t ws_ld, int splits, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int64_t total = g.m * g.n;
  const unsigned blocks = static_cast<unsigned>(total / 256 + 1 < 65536 ? total / 256 + 1 : 65535);
  switch (g.out_dtype) {
    case DType::bf16: splitk_reduce_kernel<__nv_bfloat16><<<blocks, 256, 0, s>>>(g, ws, ws_ld, splits); break;
    case DType::fp16: splitk_reduce_kernel<__half><<<blocks, 256, 0, s>>>(g, ws, ws_ld, splits); break;
    case DType::fp32: splitk_reduce_kernel<float><<<blocks, 256, 0, s>>>(g, ws, ws_ld, splits); break;
  }
  return cudaGetLastError();
}

}  // namespace cutegrad
