// cutegrad._C entry points of the fused attention backward: argument checks
// (every one before any launch, each error naming the tensor and the value),
// workspace sizes, and the three launches (preprocess, the CuTeDSL main kernel
// of kernels/cute/attention_bwd.py for the dtype and head dim, postprocess) on
// the caller's stream.  The caller (frontend/backends/cuda/attention_backward.py)
// allocates outputs and fp32 workspaces from the caching allocator, so a call
// is capturable in a CUDA graph once load_kernels() has run.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cuda_runtime.h>

#include <cmath>
#include <mutex>
#include <string>
#include <vector>

#include "attention_bwd_args.h"
#include "bindings.h"

namespace nb = nanobind;

namespace cutegrad {
namespace {

using Dims = std::vector<int64_t>;
constexpr const char* kOp = "attention_backward";

[[noreturn]] void fail(const std::string& msg) { throw nb::value_error((std::string(kOp) + ": " + msg).c_str()); }

std::string dims_str(const Dims& d) {
  std::string s = "(";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + ")";
}

std::once_flag g_load_once;
int g_load_error = 0;

int load_modules() {
  std::call_once(g_load_once, [] {
    for (int i = 0; i < kNumAttentionBwdKernels; ++i) {
      int err = 0;
      kAttentionBwdKernels[i].load(&err);
      if (err != 0 && g_load_error == 0) g_load_error = err;
    }
  });
  return g_load_error;
}

void check_cuda(int err, const std::string& what) {
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error("cutegrad._C: " + what + " failed: " + cudaGetErrorName(static_cast<cudaError_t>(err)) +
                             ": " + cudaGetErrorString(static_cast<cudaError_t>(err)));
  }
}

AttnDType parse_dtype(const std::string& s) {
  if (s == "bf16" || s == "bfloat16") return AttnDType::bf16;
  if (s == "fp16" || s == "float16") return AttnDType::fp16;
  throw nb::type_error((std::string(kOp) + ": unsupported dtype '" + s + "' (the fused kernel takes bf16 or fp16)").c_str());
}

const AttentionBwdKernelEntry* find_kernel(AttnDType dt, int64_t head_dim, bool dropout) {
  for (int i = 0; i < kNumAttentionBwdKernels; ++i)
    if (kAttentionBwdKernels[i].dtype == dt && kAttentionBwdKernels[i].head_dim == head_dim &&
        kAttentionBwdKernels[i].dropout == dropout)
      return &kAttentionBwdKernels[i];
  return nullptr;
}

std::string supported_head_dims(AttnDType dt) {
  std::string s;
  for (int i = 0; i < kNumAttentionBwdKernels; ++i)
    if (kAttentionBwdKernels[i].dtype == dt && !kAttentionBwdKernels[i].dropout)
      s += (s.empty() ? "" : ", ") + std::to_string(kAttentionBwdKernels[i].head_dim);
  return s.empty() ? "none (no fused kernels in this build)" : s;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// (lse2/delta elements, dq accumulator elements, dq parts) for a call.
std::tuple<int64_t, int64_t, int64_t> workspace(int64_t batch, int64_t sq, int64_t hq, int64_t sk, int64_t head_dim,
                                                bool deterministic) {
  const int64_t sq_pad = ceil_div(sq, kAttentionBwdBlockM) * kAttentionBwdBlockM;
  const int64_t parts = deterministic ? ceil_div(sk, kAttentionBwdBlockN) : 1;
  return {batch * hq * sq_pad, parts * batch * hq * sq_pad * head_dim, parts};
}

// A (B, S, H, D) tensor: 4 strides, unit stride on D; `tma`: read by TMA, so
// 16-byte aligned base and every other stride a multiple of 8 elements.
void check_bshd(const char* name, uintptr_t ptr, const Dims& strides, bool tma) {
  if (ptr == 0) fail(std::string(name) + " is a null pointer");
  if (strides.size() != 4) fail(std::string(name) + " needs 4 strides (B, S, H, D), got " + std::to_string(strides.size()));
  if (strides[3] != 1) fail(std::string(name) + " must have unit stride on the head dim, got strides " + dims_str(strides));
  if (tma) {
    if (ptr % 16 != 0) fail(std::string(name) + " must be 16-byte aligned for TMA");
    for (int i = 0; i < 3; ++i)
      if (strides[i] % 8 != 0 || strides[i] < 0)
        fail(std::string(name) + " strides " + dims_str(strides) + " must be non-negative multiples of 8 elements (16 bytes) for TMA");
  } else if (ptr % 2 != 0) {
    fail(std::string(name) + " is not aligned to its element size");
  }
}

int current_sm() {
  int dev = 0, major = 0, minor = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  check_cuda(err, std::string(kOp) + ": querying the current device");
  return major * 10 + minor;
}

std::string attention_backward(uintptr_t q, const Dims& q_shape, const Dims& q_strides, uintptr_t k, const Dims& k_shape,
                               const Dims& k_strides, uintptr_t v, const Dims& v_strides, uintptr_t out,
                               const Dims& out_strides, uintptr_t dout, const Dims& dout_strides, uintptr_t lse,
                               const Dims& lse_strides, uintptr_t dq, const Dims& dq_strides, uintptr_t dk,
                               const Dims& dk_strides, uintptr_t dv, const Dims& dv_strides, uintptr_t lse2,
                               uintptr_t delta, uintptr_t dq_acc, const std::string& dtype, double scale, bool is_causal,
                               bool deterministic, double dropout_p, uint64_t seed, uintptr_t seed_ptr, uint64_t offset,
                               uintptr_t offset_ptr, uintptr_t rng, uintptr_t stream) {
  const AttnDType dt = parse_dtype(dtype);
  if (q_shape.size() != 4) fail("q shape must be (B, Sq, Hq, D), got " + dims_str(q_shape));
  if (k_shape.size() != 4) fail("k shape must be (B, Sk, Hkv, D), got " + dims_str(k_shape));
  const int64_t B = q_shape[0], Sq = q_shape[1], Hq = q_shape[2], D = q_shape[3];
  const int64_t Sk = k_shape[1], Hkv = k_shape[2];
  if (k_shape[0] != B) fail("batch of q " + dims_str(q_shape) + " and k " + dims_str(k_shape) + " differ");
  if (k_shape[3] != D) fail("head dim of q " + dims_str(q_shape) + " and k " + dims_str(k_shape) + " differ");
  if (B < 1 || Sq < 1 || Sk < 1 || Hq < 1 || Hkv < 1)
    fail("every extent must be at least 1, got q " + dims_str(q_shape) + ", k " + dims_str(k_shape));
  if (Hq % Hkv != 0) fail("q heads (" + std::to_string(Hq) + ") must be a multiple of k/v heads (" + std::to_string(Hkv) + ")");
  if (Sq > INT32_MAX || Sk > INT32_MAX || B > 65535 || Hkv > 65535)
    fail("extents out of the kernel's range: q " + dims_str(q_shape) + ", k " + dims_str(k_shape) +
         " (sequence lengths < 2^31, batch and k/v heads <= 65535)");
  if (!(dropout_p >= 0.0 && dropout_p < 1.0))
    fail("dropout_p must be in [0, 1), got " + std::to_string(dropout_p));
  const bool dropout = dropout_p > 0.0;
  const AttentionBwdKernelEntry* kernel = find_kernel(dt, D, dropout);
  if (kernel == nullptr)
    fail("no fused kernel for head dim " + std::to_string(D) + " and " + dtype + (dropout ? " with dropout" : "") +
         " (built head dims: " + supported_head_dims(dt) + ")");
  if (!std::isfinite(scale) || scale == 0.0) fail("scale must be a finite non-zero number, got " + std::to_string(scale));
  check_bshd("q", q, q_strides, true);
  check_bshd("k", k, k_strides, true);
  check_bshd("v", v, v_strides, true);
  check_bshd("dout", dout, dout_strides, true);
  check_bshd("out", out, out_strides, false);
  check_bshd("dq", dq, dq_strides, false);
  check_bshd("dk", dk, dk_strides, false);
  check_bshd("dv", dv, dv_strides, false);
  if (lse == 0 || lse % 4 != 0) fail("lse must be a non-null 4-byte aligned float32 pointer");
  if (lse_strides.size() != 3 || lse_strides[2] != 1)
    fail("lse must be (B, Hq, Sq) float32 with unit stride on Sq, got strides " + dims_str(lse_strides));
  for (auto [p, name] : {std::pair{lse2, "lse2 workspace"}, {delta, "delta workspace"}, {dq_acc, "dq accumulator"}})
    if (p == 0 || p % 16 != 0) fail(std::string(name) + " must be a non-null 16-byte aligned pointer");
  if (dropout && (rng == 0 || rng % 16 != 0)) fail("with dropout the rng workspace must be a non-null 16-byte aligned pointer");
  if (dropout && ((seed_ptr % 8) != 0 || (offset_ptr % 8) != 0))
    fail("the Philox seed / offset pointers must be 8-byte aligned (or 0)");
  const int sm = current_sm();
  if (sm != kernel->sm)
    fail("the fused kernel " + std::string(kernel->name) + " runs on sm_" + std::to_string(kernel->sm) +
         " only; this device is sm_" + std::to_string(sm));
  check_cuda(load_modules(), "loading the attention backward kernel modules");

  AttentionBwdArgs a{};
  a.q = reinterpret_cast<const void*>(q);
  a.k = reinterpret_cast<const void*>(k);
  a.v = reinterpret_cast<const void*>(v);
  a.out = reinterpret_cast<const void*>(out);
  a.dout = reinterpret_cast<const void*>(dout);
  a.lse = reinterpret_cast<const float*>(lse);
  a.dq = reinterpret_cast<void*>(dq);
  a.dk = reinterpret_cast<void*>(dk);
  a.dv = reinterpret_cast<void*>(dv);
  a.lse2 = reinterpret_cast<float*>(lse2);
  a.delta = reinterpret_cast<float*>(delta);
  a.dq_acc = reinterpret_cast<float*>(dq_acc);
  a.rng = reinterpret_cast<int64_t*>(rng);
  a.batch = B, a.sq = Sq, a.sk = Sk, a.hq = Hq, a.hkv = Hkv, a.head_dim = D;
  a.sq_pad = ceil_div(Sq, kAttentionBwdBlockM) * kAttentionBwdBlockM;
  a.dq_parts = std::get<2>(workspace(B, Sq, Hq, Sk, D, deterministic));
  a.q_sb = q_strides[0], a.q_ss = q_strides[1], a.q_sh = q_strides[2];
  a.k_sb = k_strides[0], a.k_ss = k_strides[1], a.k_sh = k_strides[2];
  a.v_sb = v_strides[0], a.v_ss = v_strides[1], a.v_sh = v_strides[2];
  a.o_sb = out_strides[0], a.o_ss = out_strides[1], a.o_sh = out_strides[2];
  a.do_sb = dout_strides[0], a.do_ss = dout_strides[1], a.do_sh = dout_strides[2];
  a.lse_sb = lse_strides[0], a.lse_sh = lse_strides[1];
  a.dq_sb = dq_strides[0], a.dq_ss = dq_strides[1], a.dq_sh = dq_strides[2];
  a.dk_sb = dk_strides[0], a.dk_ss = dk_strides[1], a.dk_sh = dk_strides[2];
  a.dv_sb = dv_strides[0], a.dv_ss = dv_strides[1], a.dv_sh = dv_strides[2];
  a.scale = static_cast<float>(scale);
  a.is_causal = is_causal;
  a.deterministic = deterministic;
  a.dropout = dropout;
  a.seed = seed, a.offset = offset;
  a.seed_ptr = reinterpret_cast<const void*>(seed_ptr);
  a.offset_ptr = reinterpret_cast<const void*>(offset_ptr);
  a.keep_prob = static_cast<float>(1.0 - dropout_p);
  a.keep_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  a.dtype = dt;
  a.block_m = kAttentionBwdBlockM;
  a.block_n = kAttentionBwdBlockN;
  void* s = reinterpret_cast<void*>(stream);
  check_cuda(attention_bwd_preprocess(a, s), "launch of attention_bwd_preprocess");
  check_cuda(kernel->launch(a, s), std::string("launch of ") + kernel->name);
  check_cuda(attention_bwd_postprocess(a, s), "launch of attention_bwd_postprocess");
  return kernel->name;
}

nb::list specializations() {
  nb::list out;
  for (int i = 0; i < kNumAttentionBwdKernels; ++i) {
    const AttentionBwdKernelEntry& e = kAttentionBwdKernels[i];
    nb::dict d;
    d["name"] = e.name;
    d["dtype"] = e.dtype == AttnDType::bf16 ? "bf16" : "fp16";
    d["head_dim"] = e.head_dim;
    d["dropout"] = e.dropout;
    d["sm"] = e.sm;
    out.append(d);
  }
  return out;
}

void add_functions(nb::module_& m) {
  m.def("attention_backward", &attention_backward, nb::arg("q"), nb::arg("q_shape"), nb::arg("q_strides"), nb::arg("k"),
        nb::arg("k_shape"), nb::arg("k_strides"), nb::arg("v"), nb::arg("v_strides"), nb::arg("out"),
        nb::arg("out_strides"), nb::arg("dout"), nb::arg("dout_strides"), nb::arg("lse"), nb::arg("lse_strides"),
        nb::arg("dq"), nb::arg("dq_strides"), nb::arg("dk"), nb::arg("dk_strides"), nb::arg("dv"),
        nb::arg("dv_strides"), nb::arg("lse2"), nb::arg("delta"), nb::arg("dq_acc"), nb::arg("dtype"),
        nb::arg("scale"), nb::arg("is_causal"), nb::arg("deterministic"), nb::arg("dropout_p") = 0.0,
        nb::arg("seed") = 0, nb::arg("seed_ptr") = 0, nb::arg("offset") = 0, nb::arg("offset_ptr") = 0,
        nb::arg("rng") = 0, nb::arg("stream") = 0,
        "Fused attention backward (dq, dk, dv) on raw pointers: preprocess, the CuTeDSL main kernel, "
        "postprocess, on `stream`; returns the main kernel's name.");
  m.def("attention_backward_workspace", &workspace, nb::arg("batch"), nb::arg("sq"), nb::arg("hq"), nb::arg("sk"),
        nb::arg("head_dim"), nb::arg("deterministic"),
        "(elements of lse2 and of delta, elements of the fp32 dq accumulator, dq parts) for a call.");
  m.def("attention_backward_specializations", &specializations, "The built CuTeDSL attention backward kernels.");
}

Bindings g_attention_bwd_bindings(&add_functions, &load_modules);

}  // namespace
}  // namespace cutegrad
