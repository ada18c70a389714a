// Plain-data description of one GEMM call, shared by the nanobind module, the
// SIMT fallback (nvcc) and the table of AOT CuTeDSL kernels (generated at build
// time by kernels/cute/aot.py).  No CUDA or Python headers here on purpose: the
// three translation units are compiled by different compilers.
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define CUTEGRAD_HD __host__ __device__
#else
#define CUTEGRAD_HD
#endif

namespace cutegrad {

// tf32: fp32 operands in memory that may be multiplied on TF32 tensor cores (the "high"
// float32 matmul precision); the SIMT fallback treats them as fp32.  Never an output dtype.
enum class DType : int { bf16 = 0, fp16 = 1, fp32 = 2, tf32 = 3 };
// The integers are the Python boundary's codes too (cutegrad._gemm.EPILOGUES).
// residual / bias_residual add aux[m, n] last; bias_gelu_aux writes the
// pre-activation (A @ B + bias, rounded to the output dtype) to aux and
// GELU of it to D, so the backward has what gelu_bwd needs.
enum class Epilogue : int {
  none = 0, bias = 1, gelu = 2, bias_gelu = 3, gelu_bwd = 4, residual = 5, bias_residual = 6, bias_gelu_aux = 7
};
constexpr int kNumEpilogues = 8;

CUTEGRAD_HD inline bool epilogue_adds_bias(Epilogue e) {
  return e == Epilogue::bias || e == Epilogue::bias_gelu || e == Epilogue::bias_residual ||
         e == Epilogue::bias_gelu_aux;
}
CUTEGRAD_HD inline bool epilogue_applies_gelu(Epilogue e) {
  return e == Epilogue::gelu || e == Epilogue::bias_gelu || e == Epilogue::bias_gelu_aux;
}
CUTEGRAD_HD inline bool epilogue_adds_residual(Epilogue e) { return e == Epilogue::residual || e == Epilogue::bias_residual; }
// Every epilogue that reads or writes the M x N aux tensor.
CUTEGRAD_HD inline bool epilogue_uses_aux(Epilogue e) {
  return e == Epilogue::gelu_bwd || epilogue_adds_residual(e) || e == Epilogue::bias_gelu_aux;
}

// D[l] = epilogue(A[l] (M x K) @ B[l] (K x N) (+ D[l] if accumulate)).
// Strides are in elements.  A is addressed a[l*a_sl + m*a_sm + k*a_sk],
// B as b[l*b_sl + k*b_sk + n*b_sn], D as d[l*d_sl + m*d_sm + n] (unit column
// stride), aux (pre-activation or residual) like D with its own strides, bias[n].
struct GemmArgs {
  const void* a;
  const void* b;
  void* d;
  const void* bias;
  const void* aux;
  int64_t m, n, k, batch;
  int64_t a_sl, a_sm, a_sk;
  int64_t b_sl, b_sk, b_sn;
  int64_t d_sl, d_sm;
  int64_t aux_sl, aux_sm;
  DType in_dtype;
  DType out_dtype;
  Epilogue epilogue;
  bool accumulate;
  int32_t max_ctas;  // persistent grid size for the CuTeDSL kernels (#SMs)
};

// One exported CuTeDSL specialization (see kernels/cute/gemm.py).
struct GemmKernelEntry {
  const char* name;
  DType in_dtype;
  DType out_dtype;
  char a_major;  // 'k' or 'm'
  char b_major;  // 'k' or 'n'
  int tile_m;
  int tile_n;
  Epilogue epilogue;
  bool accumulate;
  int sm;  // compute capability the cubin runs on, e.g. 90
  void (*load)(int* cuda_error);  // loads the module on every device
  int (*launch)(const GemmArgs& args, void* stream);  // returns a cudaError_t
};

extern const GemmKernelEntry kGemmKernels[];
extern const int kNumGemmKernels;

// SIMT fallback (kernels/cuda/gemm_fallback.cu): any dtype combination, any
// strides, any size; returns a cudaError_t.
int gemm_fallback_launch(const GemmArgs& args, void* stream);

// Split-K reduction (kernels/cuda/gemm_splitk_reduce.cu): D = epilogue(sum of
// `splits` fp32 partial products in ws (row stride ws_ld, slice stride
// ws_ld * M) (+ D)); only the single-batch fields of args are used.
int gemm_splitk_reduce(const GemmArgs& args, const float* ws, int64_t ws_ld, int splits, void* stream);

}  // namespace cutegrad
