// SIMT GEMM fallback: correct for every shape, stride and dtype the CuTeDSL
// kernels cannot take (extents below a tile, strides or pointers that break
// TMA's 16-byte rule, GPUs other than sm_90, fp32 inputs, epilogue and
// accumulate combinations without an AOT specialization).  It is also the
// fp32 GEMM (there is no tf32 path) and the bf16 GEMM of narrow outputs
// (N = 10 or 36 classes), so it is a tiled SGEMM rather than a reference loop.
//
// Design: a 256-thread block computes a BM x BN tile of D; each thread owns a
// TM x TN register tile made of 4x4 blocks spaced BM/(TM/4) rows and
// BN/(TN/4) columns apart, so its shared-memory reads are float4 loads that
// the 16 threads of a half-warp take from consecutive addresses (no bank
// conflicts).  A and B are staged as fp32 (every input dtype converts on
// load, the arithmetic is fp32 FMA) in two shared-memory buffers of BK
// k-slices: while the block computes on one, each thread already holds its
// share of the next slice in registers and stores it into the other buffer,
// so there is one __syncthreads per slice.  Global loads follow whichever of
// the operand's strides is 1 (k-major or m/n-major) so that neighbouring
// threads read neighbouring addresses; every load and store is predicated, so
// any M, N, K (odd, below a tile) and any strides work without padding.
// Shared rows are padded by 4 floats against bank conflicts on the
// k-major stores while keeping float4 alignment.
// Grid: x over N tiles, y over M tiles, z over the batch; y and z loop, so
// more than 65535 M tiles or batch entries are fine.
// Epilogue as the tensor-core kernel's: (+ D) (+ bias[n]) (store the
// pre-activation) (GELU-tanh) or (* gelu'(pre-activation)) (+ residual).
//
// Tile configurations (chosen per call in launch_for_input):
//   128x128x8, 8x8 per thread   large outputs
//   64x64x16,  4x4 per thread   outputs with too few 128x128 tiles to fill the GPU
//   128x32x16, 4x4 per thread   narrow N (<= 48: classifier heads)
// AOT specializations: each configuration for inputs bf16 / fp16 / fp32 and
// outputs bf16 / fp16 / fp32.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "gemm_args.h"

namespace cutegrad {
namespace {

constexpr int kThreads = 256;
constexpr int kPad = 4;
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

// One operand's (rows x BK) slice, rows being M for A and N for B: element
// (r, k) sits at base[r * s_r + k * s_k].  Thread t holds elements
// e = t + i * kThreads of the slice; when s_k == 1 consecutive e walk k,
// otherwise they walk r.  Since ROWS and BK divide kThreads, a thread's
// elements share one k (k-fast) or one r (r-fast) and step evenly in the
// other, so one pointer and one stride address all of them.
template <typename TIn, int ROWS, int BK>
struct SliceLoader {
  static constexpr int kPer = ROWS * BK / kThreads;
  static_assert(ROWS * BK % kThreads == 0 && kThreads % ROWS == 0 && kThreads % BK == 0,
                "slice must split evenly over the block");
  float v[kPer];

  __device__ __forceinline__ void load(const TIn* base, int64_t r0, int64_t rows, int64_t s_r, int64_t k0,
                                       int64_t k_ext, int64_t s_k, bool k_fast) {
    const int r_first = k_fast ? threadIdx.x / BK : threadIdx.x % ROWS;
    const int k_first = k_fast ? threadIdx.x % BK : threadIdx.x / ROWS;
    const int r_step = k_fast ? kThreads / BK : 0;
    const int k_step = k_fast ? 0 : kThreads / ROWS;
    const int64_t gr0 = r0 + r_first, gk0 = k0 + k_first;
    const TIn* p = base + gr0 * s_r + gk0 * s_k;
    const int64_t step = r_step * s_r + k_step * s_k;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const bool inside = gr0 + i * r_step < rows && gk0 + i * k_step < k_ext;
      v[i] = inside ? to_f32(p[i * step]) : 0.f;
    }
  }

  __device__ __forceinline__ void store(float (*smem)[ROWS + kPad], bool k_fast) const {
    const int r_first = k_fast ? threadIdx.x / BK : threadIdx.x % ROWS;
    const int k_first = k_fast ? threadIdx.x % BK : threadIdx.x / ROWS;
    const int r_step = k_fast ? kThreads / BK : 0;
    const int k_step = k_fast ? 0 : kThreads / ROWS;
#pragma unroll
    for (int i = 0; i < kPer; ++i) smem[k_first + i * k_step][r_first + i * r_step] = v[i];
  }
};

// Two blocks per SM fit the 4x4 configurations in 128 registers without
// spilling; the 8x8 one needs more than 128 and runs one block per SM.
template <typename TIn, typename TOut, int BM, int BN, int BK, int TM, int TN>
__global__ void __launch_bounds__(kThreads, (TM * TN > 16 ? 1 : 2)) gemm_simt_kernel(GemmArgs g) {
  static_assert((BM / TM) * (BN / TN) == kThreads, "one register tile per thread");
  static_assert(TM % 4 == 0 && TN % 4 == 0, "register tiles are made of 4x4 blocks");
  constexpr int kThreadsN = BN / TN;
  constexpr int kGroupsM = TM / 4, kGroupsN = TN / 4;
  constexpr int kGroupStrideM = BM / kGroupsM, kGroupStrideN = BN / kGroupsN;
  __shared__ __align__(16) float sA[2][BK][BM + kPad];
  __shared__ __align__(16) float sB[2][BK][BN + kPad];

  const int tn = threadIdx.x % kThreadsN, tm = threadIdx.x / kThreadsN;
  const bool a_k_fast = g.a_sk == 1 && g.a_sm != 1;
  const bool b_k_fast = g.b_sk == 1 && g.b_sn != 1;
  const int64_t m_tiles = (g.m + BM - 1) / BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN;
  const TOut* bias = static_cast<const TOut*>(g.bias);
  const bool add_bias = epilogue_adds_bias(g.epilogue);
  const bool gelu = epilogue_applies_gelu(g.epilogue);
  const bool gelu_bwd = g.epilogue == Epilogue::gelu_bwd;
  const bool add_residual = epilogue_adds_residual(g.epilogue);
  const bool store_preact = g.epilogue == Epilogue::bias_gelu_aux;

  for (int64_t l = blockIdx.z; l < g.batch; l += gridDim.z) {
    const TIn* A = static_cast<const TIn*>(g.a) + l * g.a_sl;
    const TIn* B = static_cast<const TIn*>(g.b) + l * g.b_sl;
    TOut* D = static_cast<TOut*>(g.d) + l * g.d_sl;
    TOut* aux = g.aux ? static_cast<TOut*>(const_cast<void*>(g.aux)) + l * g.aux_sl : nullptr;
    for (int64_t mt = blockIdx.y; mt < m_tiles; mt += gridDim.y) {
      const int64_t m0 = mt * BM;
      float acc[TM][TN];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;

      SliceLoader<TIn, BM, BK> la;
      SliceLoader<TIn, BN, BK> lb;
      la.load(A, m0, g.m, g.a_sm, 0, g.k, g.a_sk, a_k_fast);
      lb.load(B, n0, g.n, g.b_sn, 0, g.k, g.b_sk, b_k_fast);
      la.store(sA[0], a_k_fast);
      lb.store(sB[0], b_k_fast);
      __syncthreads();
      int buf = 0;
      for (int64_t k0 = 0; k0 < g.k; k0 += BK) {
        const bool has_next = k0 + BK < g.k;
        if (has_next) {
          la.load(A, m0, g.m, g.a_sm, k0 + BK, g.k, g.a_sk, a_k_fast);
          lb.load(B, n0, g.n, g.b_sn, k0 + BK, g.k, g.b_sk, b_k_fast);
        }
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
          float a[TM], b[TN];
#pragma unroll
          for (int gi = 0; gi < kGroupsM; ++gi) {
            const float4 v = *reinterpret_cast<const float4*>(&sA[buf][kk][gi * kGroupStrideM + tm * 4]);
            a[gi * 4 + 0] = v.x; a[gi * 4 + 1] = v.y; a[gi * 4 + 2] = v.z; a[gi * 4 + 3] = v.w;
          }
#pragma unroll
          for (int gj = 0; gj < kGroupsN; ++gj) {
            const float4 v = *reinterpret_cast<const float4*>(&sB[buf][kk][gj * kGroupStrideN + tn * 4]);
            b[gj * 4 + 0] = v.x; b[gj * 4 + 1] = v.y; b[gj * 4 + 2] = v.z; b[gj * 4 + 3] = v.w;
          }
#pragma unroll
          for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        if (has_next) {
          // The other buffer was last read before the previous barrier, so it is free.
          la.store(sA[buf ^ 1], a_k_fast);
          lb.store(sB[buf ^ 1], b_k_fast);
        }
        __syncthreads();
        buf ^= 1;
      }

#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const int64_t m = m0 + (i / 4) * kGroupStrideM + tm * 4 + i % 4;
        if (m >= g.m) continue;
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          const int64_t n = n0 + (j / 4) * kGroupStrideN + tn * 4 + j % 4;
          if (n >= g.n) continue;
          float v = acc[i][j];
          if (g.accumulate) v += to_f32(D[m * g.d_sm + n]);
          if (add_bias) v += to_f32(bias[n]);
          if (store_preact) {
            // The backward's GELU derivative reads the rounded pre-activation:
            // apply GELU to that same rounded value, as the unfused ops would.
            const TOut z = from_f32<TOut>(v);
            aux[m * g.aux_sm + n] = z;
            v = to_f32(z);
          }
          if (gelu) v = 0.5f * v * (1.f + tanhf(kGeluK0 * (v + kGeluK1 * v * v * v)));
          if (gelu_bwd) {
            const float x = to_f32(aux[m * g.aux_sm + n]);
            const float t = tanhf(kGeluK0 * (x + kGeluK1 * x * x * x));
            v *= 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * kGeluK0 * (1.f + 3.f * kGeluK1 * x * x);
          }
          if (add_residual) v += to_f32(aux[m * g.aux_sm + n]);
          D[m * g.d_sm + n] = from_f32<TOut>(v);
        }
      }
    }
  }
}

unsigned clamp_grid(int64_t v, int64_t cap) { return static_cast<unsigned>(v < 1 ? 1 : (v < cap ? v : cap)); }

template <typename TIn, typename TOut, int BM, int BN, int BK, int TM, int TN>
void launch_tile(const GemmArgs& g, cudaStream_t stream) {
  dim3 grid(clamp_grid((g.n + BN - 1) / BN, 0x7fffffff), clamp_grid((g.m + BM - 1) / BM, 65535),
            clamp_grid(g.batch, 65535));
  gemm_simt_kernel<TIn, TOut, BM, BN, BK, TM, TN><<<grid, kThreads, 0, stream>>>(g);
}

template <typename TIn, typename TOut>
void launch_for_output(const GemmArgs& g, cudaStream_t stream) {
  const int64_t sms = g.max_ctas > 0 ? g.max_ctas : 132;
  const int64_t big_tiles = ((g.m + 127) / 128) * ((g.n + 127) / 128) * g.batch;
  if (g.n <= 48) launch_tile<TIn, TOut, 128, 32, 16, 4, 4>(g, stream);
  else if (big_tiles >= sms) launch_tile<TIn, TOut, 128, 128, 8, 8, 8>(g, stream);
  else launch_tile<TIn, TOut, 64, 64, 16, 4, 4>(g, stream);
}

template <typename TIn>
cudaError_t launch_for_input(const GemmArgs& g, cudaStream_t stream) {
  switch (g.out_dtype) {
    case DType::bf16: launch_for_output<TIn, __nv_bfloat16>(g, stream); break;
    case DType::fp16: launch_for_output<TIn, __half>(g, stream); break;
    case DType::fp32: launch_for_output<TIn, float>(g, stream); break;
  }
  return cudaGetLastError();
}

}  // namespace

int gemm_fallback_launch(const GemmArgs& g, void* stream) {
  if (g.m == 0 || g.n == 0 || g.batch == 0) return cudaSuccess;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (g.in_dtype) {
    case DType::bf16: return launch_for_input<__nv_bfloat16>(g, s);
    case DType::fp16: return launch_for_input<__half>(g, s);
    case DType::fp32: return launch_for_input<float>(g, s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cutegrad
