// Plain-data description of one fused attention backward call, shared by the
// bindings (attention_bwd_bindings.cpp), the pre/postprocess kernels
// (attention_bwd.cu, nvcc) and the table of AOT CuTeDSL main kernels generated
// from kernels/cute/attention_bwd.py.  No CUDA or Python headers here: the
// three translation units are compiled by different compilers.
#pragma once
#include <cstdint>

namespace cutegrad {

enum class AttnDType : int { bf16 = 0, fp16 = 1 };

// Layouts (strides in elements): q, dout (B, Sq, Hq, D) addressed
// x[b*sb + s*ss + h*sh + d]; k, v, dk, dv (B, Sk, Hkv, D) likewise; out
// (B, Sq, Hq, D) with its own strides; lse (B, Hq, Sq) fp32 with strides
// (lse_sb, lse_sh, 1).  Workspaces (fp32, contiguous): lse2 and delta
// (B, Hq, sq_pad); dq_acc (dq_parts, B, Hq, sq_pad, D), dq_parts = 1 for the
// atomic accumulator or the number of key blocks in deterministic mode.
struct AttentionBwdArgs {
  const void* q;
  const void* k;
  const void* v;
  const void* out;
  const void* dout;
  const float* lse;
  void* dq;
  void* dk;
  void* dv;
  float* lse2;
  float* delta;
  float* dq_acc;
  int64_t* rng;  // 2 int64 (seed, base offset) the preprocess resolves for the main kernel
  int64_t batch, sq, sk, hq, hkv, head_dim, sq_pad, dq_parts;
  int64_t q_sb, q_ss, q_sh;
  int64_t k_sb, k_ss, k_sh;
  int64_t v_sb, v_ss, v_sh;
  int64_t o_sb, o_ss, o_sh;
  int64_t do_sb, do_ss, do_sh;
  int64_t lse_sb, lse_sh;
  int64_t dq_sb, dq_ss, dq_sh;
  int64_t dk_sb, dk_ss, dk_sh;
  int64_t dv_sb, dv_ss, dv_sh;
  float scale;
  bool is_causal;
  bool deterministic;
  // dropout: the forward's Philox state (graphs/rng.py: seed = *seed_ptr if set, offset =
  // (*offset_ptr if set) + offset); keep_prob = float32(1 - p), keep_scale = 1 / (1 - p)
  bool dropout;
  uint64_t seed, offset;
  const void* seed_ptr;
  const void* offset_ptr;
  float keep_prob, keep_scale;
  AttnDType dtype;
  int block_m, block_n;  // the main kernel's tiles (kernels/cute/attention_bwd.py)
};

// One exported CuTeDSL main kernel (see kernels/cute/attention_bwd.py).
struct AttentionBwdKernelEntry {
  const char* name;
  AttnDType dtype;
  int head_dim;
  bool dropout;                    // regenerates the forward's dropout mask
  int sm;                          // compute capability the cubin runs on, e.g. 90
  void (*load)(int* cuda_error);   // loads the module
  int (*launch)(const AttentionBwdArgs& args, void* stream);  // returns a cudaError_t
};

extern const AttentionBwdKernelEntry kAttentionBwdKernels[];
extern const int kNumAttentionBwdKernels;
extern const int kAttentionBwdBlockM;  // query rows per main-loop step
extern const int kAttentionBwdBlockN;  // keys per CTA

// kernels/cuda/attention_bwd.cu; each returns a cudaError_t.
// delta = rowsum(dout * out), lse2 = lse * log2(e) (padding rows: 0 and +inf),
// unless deterministic, dq_acc zeroed; with dropout, rng = (seed, base offset).
int attention_bwd_preprocess(const AttentionBwdArgs& args, void* stream);
// dq = scale * (dq_acc, or the key-block-ordered sum of the partials each query
// block received), rounded once to the input dtype.
int attention_bwd_postprocess(const AttentionBwdArgs& args, void* stream);

}  // namespace cutegrad
