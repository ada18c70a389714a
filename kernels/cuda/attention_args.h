// Plain-data description of one fused attention forward call, shared by the
// nanobind binding (attention_bindings.cpp) and the table of AOT CuTeDSL kernels
// generated from kernels/cute/attention_fwd.py.  No CUDA or Python headers here:
// the two translation units are compiled separately.
#pragma once
#include <cstdint>

namespace cutegrad {

// q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D) with element strides *_sb, *_ss,
// *_sh (unit stride on D); O a contiguous (B, Sq, Hq, D) tensor of q's dtype;
// lse a contiguous fp32 (B, Hq, Sq) tensor.
struct AttentionFwdArgs {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  void* lse;
  int32_t batch, sq, sk, hq, hkv, head_dim;
  int64_t q_sb, q_ss, q_sh;
  int64_t k_sb, k_ss, k_sh;
  int64_t v_sb, v_ss, v_sh;
  float scale_log2;  // softmax scale * log2(e)
  bool causal;       // top-left aligned: row i sees keys j <= i
  // Dropout (kernels built with it): Philox seed and offset, or, when rng_state is
  // set (graph capture), seed = rng_state[0] and offset = rng_state[1] + rng_offset.
  void* rng_state;     // device int64[2] or null
  int64_t rng_seed;    // the uint64 seed's bits
  int64_t rng_offset;  // a multiple of 4
  float keep_scaled;   // float32(1 - p) * 2^24: a value is kept iff (philox lane >> 8) < keep_scaled
  float rp_keep;       // 1 / (1 - p)
};

// One exported CuTeDSL specialization (see kernels/cute/attention_fwd.py).
struct AttentionFwdKernelEntry {
  const char* name;
  int dtype;     // 0 = bf16, 1 = fp16
  int head_dim;
  bool dropout;  // built with dropout
  bool short_seq;  // the short-sequence kernel (Sk <= 128; chosen for Sq <= 64)
  int sm;        // compute capability the cubin runs on, e.g. 90
  void (*load)(int* cuda_error);  // loads the module on every device
  int (*launch)(const AttentionFwdArgs& args, void* stream);  // returns a cudaError_t
};

extern const AttentionFwdKernelEntry kAttentionFwdKernels[];
extern const int kNumAttentionFwdKernels;

}  // namespace cutegrad
