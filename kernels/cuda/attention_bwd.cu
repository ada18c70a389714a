// The two memory-bound steps around the fused attention backward's CuTeDSL
// main kernel (kernels/cute/attention_bwd.py has the whole algorithm).
//
// preprocess: one warp per (batch, q head, query row) of the padded row range
//   [0, sq_pad): delta = rowsum(dout * out) in fp32 (each lane a strided slice
//   of D, then a shuffle reduction: a fixed order, so bit-reproducible) and
//   lse2 = lse * log2(e); padding rows get delta = 0 and lse2 = +inf, which the
//   main kernel turns into P = 0 without a mask.  Unless deterministic, the
//   warp also zeroes its row of the fp32 dQ accumulator.  With dropout, one
//   thread resolves the forward's Philox (seed, offset) -- from device memory
//   under graph capture -- into the 16-byte rng workspace the main kernel reads.
// postprocess: one thread per dq element: scale * the accumulator, or in
//   deterministic mode the sum, in key-block order, of the partials of the key
//   blocks the element's query block saw (causal: the leading blocks up to the
//   diagonal; others were never written), rounded once to bf16/fp16.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "attention_bwd_args.h"

namespace cutegrad {
namespace {

constexpr int kWarpsPerBlock = 8;

__device__ __forceinline__ float load_half(const void* base, AttnDType dt, int64_t off) {
  return dt == AttnDType::bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(base)[off])
                               : __half2float(static_cast<const __half*>(base)[off]);
}

__device__ __forceinline__ void store_half(void* base, AttnDType dt, int64_t off, float v) {
  if (dt == AttnDType::bf16)
    static_cast<__nv_bfloat16*>(base)[off] = __float2bfloat16_rn(v);
  else
    static_cast<__half*>(base)[off] = __float2half_rn(v);
}

__global__ void __launch_bounds__(kWarpsPerBlock * 32) preprocess_kernel(const AttentionBwdArgs a) {
  const int64_t row_id = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row_id >= a.batch * a.hq * a.sq_pad) return;
  const int64_t row = row_id % a.sq_pad;
  const int64_t h = row_id / a.sq_pad % a.hq;
  const int64_t b = row_id / (a.sq_pad * a.hq);
  float sum = 0.f;
  if (row < a.sq) {
    const int64_t o = b * a.o_sb + row * a.o_ss + h * a.o_sh;
    const int64_t g = b * a.do_sb + row * a.do_ss + h * a.do_sh;
    for (int64_t d = lane; d < a.head_dim; d += 32) sum += load_half(a.out, a.dtype, o + d) * load_half(a.dout, a.dtype, g + d);
  }
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane == 0) {
    a.delta[row_id] = row < a.sq ? sum : 0.f;
    a.lse2[row_id] = row < a.sq ? a.lse[b * a.lse_sb + h * a.lse_sh + row] * 1.4426950408889634f : INFINITY;
  }
  if (!a.deterministic) {
    float* acc = a.dq_acc + row_id * a.head_dim;
    for (int64_t d = lane; d < a.head_dim; d += 32) acc[d] = 0.f;
  }
  if (a.dropout && row_id == 0 && lane == 0) {
    // read here, in stream order, so a graph replay sees the state its capture reserved
    a.rng[0] = static_cast<int64_t>(a.seed_ptr ? *static_cast<const uint64_t*>(a.seed_ptr) : a.seed);
    a.rng[1] = static_cast<int64_t>((a.offset_ptr ? *static_cast<const uint64_t*>(a.offset_ptr) : 0) + a.offset);
  }
}

__global__ void __launch_bounds__(256) postprocess_kernel(const AttentionBwdArgs a) {
  const int64_t total = a.batch * a.sq * a.hq * a.head_dim;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = i % a.head_dim;
    const int64_t h = i / a.head_dim % a.hq;
    const int64_t s = i / (a.head_dim * a.hq) % a.sq;
    const int64_t b = i / (a.head_dim * a.hq * a.sq);
    const int64_t part_stride = a.batch * a.hq * a.sq_pad * a.head_dim;
    const float* acc = a.dq_acc + ((b * a.hq + h) * a.sq_pad + s) * a.head_dim + d;
    float v = acc[0];
    if (a.deterministic) {
      const int64_t m = s / a.block_m;
      int64_t seen = a.dq_parts;
      if (a.is_causal) {
        const int64_t last = (m * a.block_m + a.block_m - 1) / a.block_n + 1;
        seen = last < seen ? last : seen;
      }
      for (int64_t n = 1; n < seen; ++n) v += acc[n * part_stride];
    }
    store_half(a.dq, a.dtype, b * a.dq_sb + s * a.dq_ss + h * a.dq_sh + d, v * a.scale);
  }
}

}  // namespace

int attention_bwd_preprocess(const AttentionBwdArgs& a, void* stream) {
  const int64_t rows = a.batch * a.hq * a.sq_pad;
  const unsigned blocks = static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
  preprocess_kernel<<<blocks, kWarpsPerBlock * 32, 0, static_cast<cudaStream_t>(stream)>>>(a);
  return static_cast<int>(cudaGetLastError());
}

int attention_bwd_postprocess(const AttentionBwdArgs& a, void* stream) {
  const int64_t total = a.batch * a.sq * a.hq * a.head_dim;
  const int64_t want = (total + 255) / 256;
  const unsigned blocks = static_cast<unsigned>(want < 65536 ? want : 65536);
  postprocess_kernel<<<blocks, 256, 0, static_cast<cudaStream_t>(stream)>>>(a);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cutegrad
