// nanobind entry points of the fused attention forward (AOT CuTeDSL kernels of
// kernels/cute/attention_fwd.py, table generated into build/aot/attention_fwd_registry.cpp).
//
// _C.attention_fwd validates everything the kernels assume (dtype, head dim,
// extents, alignment of pointers and strides, GQA grouping, the device's
// compute capability) and raises ValueError naming the mismatch before
// anything is launched; a failed launch raises RuntimeError naming the kernel.
// The frontend's dispatcher (frontend/ops/attention.py) only sends calls that
// pass these checks, so a raise here is a bug upstream, never a fallback.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "attention_args.h"
#include "bindings.h"

namespace nb = nanobind;

namespace cutegrad {
namespace {

constexpr int64_t kMaxGridDim = 65535;
// Limits of the short-sequence kernel (one 64-row query tile per consumer warpgroup, the
// whole K/V of its head in one 128-key block); the backend chooses it
// (frontend/backends/cuda/attention.py: kernel_variant).
constexpr int64_t kShortMaxSq = 64;
constexpr int64_t kShortMaxSk = 128;

[[noreturn]] void fail(const std::string& msg) { throw nb::value_error(("attention_fwd: " + msg).c_str()); }

std::once_flag g_attention_fwd_once;
int g_attention_fwd_error = 0;

int load_modules() {
  std::call_once(g_attention_fwd_once, [] {
    for (int i = 0; i < kNumAttentionFwdKernels; ++i) {
      int err = 0;
      kAttentionFwdKernels[i].load(&err);
      if (err != 0 && g_attention_fwd_error == 0) g_attention_fwd_error = err;
    }
  });
  return g_attention_fwd_error;
}

int device_sm() {
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error("cutegrad._C: attention_fwd cannot query the current CUDA device");
  }
  return major * 10 + minor;
}

void check_strides(const char* what, const std::vector<int64_t>& st) {
  if (st.size() != 3) fail(std::string(what) + " needs 3 strides (batch, sequence, head), got " + std::to_string(st.size()));
  for (int64_t s : st)
    if (s <= 0 || s % 8 != 0)
      fail(std::string(what) + " stride " + std::to_string(s) + " is not a positive multiple of 8 elements (16 bytes)");
}

void check_pointer(const char* what, uintptr_t p) {
  if (p == 0) fail(std::string(what) + " is a null pointer");
  if (p % 16 != 0) fail(std::string(what) + " is not 16-byte aligned");
}

const AttentionFwdKernelEntry* find(int dtype, int head_dim, bool dropout, bool short_seq, int sm) {
  for (int i = 0; i < kNumAttentionFwdKernels; ++i) {
    const AttentionFwdKernelEntry& e = kAttentionFwdKernels[i];
    if (e.dtype == dtype && e.head_dim == head_dim && e.dropout == dropout && e.short_seq == short_seq &&
        e.sm == sm)
      return &e;
  }
  return nullptr;
}

std::string attention_fwd(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t o, uintptr_t lse, int64_t batch,
                          int64_t sq, int64_t sk, int64_t hq, int64_t hkv, int64_t head_dim,
                          const std::vector<int64_t>& q_strides, const std::vector<int64_t>& k_strides,
                          const std::vector<int64_t>& v_strides, const std::string& dtype, double scale, bool causal,
                          double dropout_p, uint64_t rng_seed, uintptr_t rng_seed_ptr, int64_t rng_offset,
                          uintptr_t rng_offset_ptr, bool short_seq, uintptr_t stream) {
  int code = dtype == "bf16" ? 0 : dtype == "fp16" ? 1 : -1;
  if (code < 0) fail("dtype must be 'bf16' or 'fp16', got '" + dtype + "'");
  if (batch < 1 || sq < 1 || sk < 1 || hq < 1 || hkv < 1)
    fail("extents must be >= 1, got B=" + std::to_string(batch) + " Sq=" + std::to_string(sq) +
         " Sk=" + std::to_string(sk) + " Hq=" + std::to_string(hq) + " Hkv=" + std::to_string(hkv));
  if (batch > kMaxGridDim || hq > kMaxGridDim)
    fail("B and Hq must be at most 65535, got B=" + std::to_string(batch) + " Hq=" + std::to_string(hq));
  if (sq > INT32_MAX || sk > INT32_MAX) fail("sequence lengths must fit in 32 bits");
  if (hq % hkv != 0)
    fail("query heads " + std::to_string(hq) + " are not a multiple of key/value heads " + std::to_string(hkv));
  check_strides("q", q_strides);
  check_strides("k", k_strides);
  check_strides("v", v_strides);
  check_pointer("q", q);
  check_pointer("k", k);
  check_pointer("v", v);
  check_pointer("o", o);
  if (lse == 0 || lse % 4 != 0) fail("lse is a null or misaligned pointer");
  if (!(dropout_p >= 0.0 && dropout_p < 1.0)) fail("dropout_p must be in [0, 1), got " + std::to_string(dropout_p));
  bool dropout = dropout_p > 0.0;
  if (dropout) {
    if (rng_offset < 0 || rng_offset % 4 != 0)
      fail("rng_offset must be a non-negative multiple of 4, got " + std::to_string(rng_offset));
    // graphs/rng.py keeps [seed, offset] as one 16-byte buffer: both pointers or neither
    if ((rng_seed_ptr == 0) != (rng_offset_ptr == 0) || (rng_seed_ptr != 0 && rng_offset_ptr != rng_seed_ptr + 8))
      fail("rng_offset_ptr must be rng_seed_ptr + 8 (one [seed, offset] buffer), or both 0");
    if (rng_seed_ptr % 8 != 0) fail("rng_seed_ptr is not 8-byte aligned");
  }
  // (the short kernel numbers its (batch, head) items in 32 bits)
  if (short_seq && (dropout || sq > kShortMaxSq || sk > kShortMaxSk || batch * hq > INT32_MAX / 2))
    fail("the short-sequence kernel takes Sq <= 64, Sk <= 128, B * Hq < 2^30 and no dropout; got Sq=" +
         std::to_string(sq) + " Sk=" + std::to_string(sk) + (dropout ? " with dropout" : ""));
  int sm = device_sm();
  const AttentionFwdKernelEntry* e = find(code, static_cast<int>(head_dim), dropout, short_seq, sm);
  if (e == nullptr)
    fail("no specialization for dtype " + dtype + ", head dim " + std::to_string(head_dim) +
         (dropout ? " with dropout" : "") + (short_seq ? " (short)" : "") + " on sm_" + std::to_string(sm));
  if (int err = load_modules())
    throw std::runtime_error(std::string("cutegrad._C: loading the attention_fwd modules failed: ") +
                             cudaGetErrorString(static_cast<cudaError_t>(err)));
  AttentionFwdArgs a{};
  a.q = reinterpret_cast<const void*>(q);
  a.k = reinterpret_cast<const void*>(k);
  a.v = reinterpret_cast<const void*>(v);
  a.o = reinterpret_cast<void*>(o);
  a.lse = reinterpret_cast<void*>(lse);
  a.batch = static_cast<int32_t>(batch);
  a.sq = static_cast<int32_t>(sq);
  a.sk = static_cast<int32_t>(sk);
  a.hq = static_cast<int32_t>(hq);
  a.hkv = static_cast<int32_t>(hkv);
  a.head_dim = static_cast<int32_t>(head_dim);
  a.q_sb = q_strides[0], a.q_ss = q_strides[1], a.q_sh = q_strides[2];
  a.k_sb = k_strides[0], a.k_ss = k_strides[1], a.k_sh = k_strides[2];
  a.v_sb = v_strides[0], a.v_ss = v_strides[1], a.v_sh = v_strides[2];
  a.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  a.causal = causal;
  a.rng_state = dropout ? reinterpret_cast<void*>(rng_seed_ptr) : nullptr;
  a.rng_seed = static_cast<int64_t>(rng_seed);
  a.rng_offset = rng_offset;
  float keep = static_cast<float>(1.0 - dropout_p);
  a.keep_scaled = keep * 16777216.0f;
  a.rp_keep = dropout ? static_cast<float>(1.0 / (1.0 - dropout_p)) : 1.0f;
  int err = e->launch(a, reinterpret_cast<void*>(stream));
  if (err == cudaSuccess) err = cudaGetLastError();
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("cutegrad._C: launch of ") + e->name + " failed: " +
                             cudaGetErrorName(static_cast<cudaError_t>(err)) + ": " +
                             cudaGetErrorString(static_cast<cudaError_t>(err)));
  }
  return e->name;
}

nb::list attention_fwd_specializations() {
  nb::list out;
  for (int i = 0; i < kNumAttentionFwdKernels; ++i) {
    const AttentionFwdKernelEntry& e = kAttentionFwdKernels[i];
    nb::dict d;
    d["name"] = e.name;
    d["dtype"] = e.dtype == 0 ? "bf16" : "fp16";
    d["head_dim"] = e.head_dim;
    d["dropout"] = e.dropout;
    d["short"] = e.short_seq;
    d["sm"] = e.sm;
    out.append(d);
  }
  return out;
}

void add_functions(nb::module_& m) {
  m.def("attention_fwd", &attention_fwd, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("o"), nb::arg("lse"),
        nb::arg("batch"), nb::arg("sq"), nb::arg("sk"), nb::arg("hq"), nb::arg("hkv"), nb::arg("head_dim"),
        nb::arg("q_strides"), nb::arg("k_strides"), nb::arg("v_strides"), nb::arg("dtype"), nb::arg("scale"),
        nb::arg("causal"), nb::arg("dropout_p") = 0.0, nb::arg("rng_seed") = 0, nb::arg("rng_seed_ptr") = 0,
        nb::arg("rng_offset") = 0, nb::arg("rng_offset_ptr") = 0, nb::arg("short_seq") = false,
        nb::arg("stream") = 0,
        "Fused attention forward on raw device pointers; see docs/attention.md. Returns the kernel's name.");
  m.def("attention_fwd_specializations", &attention_fwd_specializations,
        "The AOT CuTeDSL attention forward specializations built into this module.");
}

static Bindings reg(&add_functions, &load_modules);

}  // namespace
}  // namespace cutegrad
