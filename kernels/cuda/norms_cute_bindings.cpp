// nanobind entry points of the CuTeDSL norms (kernels/cute/norms.py): LayerNorm
// and RMSNorm with the residual add fused in, their backward, and the finish
// that sums the per-CTA dweight/dbias/dx-column-sum partials.  cute_norm and
// cute_norm_backward also take the residual dropout of x (keep < 1 and the
// Philox state, as _C.dropout takes them; keep = 1 by default: none).
//
// Each entry returns the name of the specialization it launched, or "" when
// none fits (another device than sm_90, a row length or dtype combination
// without a specialization, a pointer not 16-byte aligned): nothing was
// launched and the caller runs the CUDA C++ kernels instead.  Arguments that
// are wrong whatever the kernel (null pointers, bad sizes) raise ValueError
// before any launch.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>
#include <nanobind/stl/map.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings.h"
#include "norm_cute_args.h"

namespace nb = nanobind;

namespace cutegrad {
namespace {

[[noreturn]] void fail(const char* op, const std::string& msg) {
  throw nb::value_error((std::string(op) + ": " + msg).c_str());
}

std::once_flag g_norm_load_once;
int g_norm_load_err = 0;

int load_norm_modules() {
  std::call_once(g_norm_load_once, [] {
    for (int i = 0; i < kNumCuteNormKernels; ++i) {
      int err = 0;
      kCuteNormKernels[i].load(&err);
      if (err != 0 && g_norm_load_err == 0) g_norm_load_err = err;
    }
  });
  return g_norm_load_err;
}

int current_sm() {
  static std::mutex mu;
  static std::map<int, int> cache;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();
    return cache[device] = -1;
  }
  return cache[device] = major * 10 + minor;
}

bool aligned16(uintptr_t p) { return p % 16 == 0; }

void check_cuda(int err, const char* name) {
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("cutegrad._C: launch of ") + name + " failed: " +
                             cudaGetErrorName(static_cast<cudaError_t>(err)) + ": " +
                             cudaGetErrorString(static_cast<cudaError_t>(err)));
  }
}

const CuteNormEntry* find(int stage, bool layer, int64_t n, int x, int res, int out, bool dres) {
  const int sm = current_sm();
  for (int i = 0; i < kNumCuteNormKernels; ++i) {
    const CuteNormEntry& e = kCuteNormKernels[i];
    if (e.stage == stage && e.layer == layer && e.n == n && e.x_dtype == x && e.res_dtype == res &&
        e.out_dtype == out && e.has_dres == dres && e.sm == sm)
      return &e;
  }
  return nullptr;
}

std::string run(const CuteNormEntry* e, const CuteNormArgs& a, uintptr_t stream) {
  if (int err = load_norm_modules()) check_cuda(err, "norm module load");
  check_cuda(e->launch(a, reinterpret_cast<void*>(stream)), e->name);
  return e->name;
}

void check_sizes(const char* op, int64_t rows, int64_t n) {
  if (rows < 1 || rows > INT32_MAX) fail(op, "rows must be in [1, 2^31), got " + std::to_string(rows));
  if (n < 1) fail(op, "row length must be positive, got " + std::to_string(n));
}

// The residual dropout's arguments (see CuteNormArgs), checked as _C.dropout checks them.
// keep = 1 (p = 0) drops nothing and reads no Philox state.
void set_dropout(const char* op, CuteNormArgs& a, double keep, uint64_t seed, uintptr_t seed_ptr, uint64_t offset,
                 uintptr_t offset_ptr) {
  if (!(keep > 0.0 && keep <= 1.0)) fail(op, "keep probability must be in (0, 1], got " + std::to_string(keep));
  if (keep == 1.0) return;
  if (offset % 4) fail(op, "Philox offset must be a multiple of 4, got " + std::to_string(offset));
  if ((seed_ptr == 0) != (offset_ptr == 0) || (seed_ptr != 0 && offset_ptr != seed_ptr + 8))
    fail(op, "offset_ptr must be seed_ptr + 8 (one [seed, offset] buffer), or both 0");
  if (seed_ptr % 8) fail(op, "seed_ptr is not 8-byte aligned");
  const float k = static_cast<float>(keep);
  a.keep_scaled = k * 16777216.f;  // exact: a power-of-two scale of the fp32 keep dropout.cu compares with
  a.drop_scale = static_cast<float>(1.0 / keep);
  a.rng_state = reinterpret_cast<const void*>(seed_ptr);
  a.rng_seed = static_cast<int64_t>(seed);
  a.rng_offset = static_cast<int64_t>(offset);
}

void check_dtype(const char* op, int code, const char* what, bool optional) {
  if (code < (optional ? kNormNone : kNormBF16) || code > kNormF32)
    fail(op, std::string(what) + " has an unknown dtype code " + std::to_string(code));
}

std::string norm_fwd(uintptr_t x, uintptr_t res, uintptr_t res_out, uintptr_t y, uintptr_t weight, uintptr_t bias,
                     uintptr_t mean, uintptr_t rstd, int64_t rows, int64_t n, int x_dtype, int res_dtype,
                     int y_dtype, bool rms, double eps, uintptr_t stream, double keep, uint64_t seed,
                     uintptr_t seed_ptr, uint64_t offset, uintptr_t offset_ptr) {
  const char* op = "cute_norm";
  check_sizes(op, rows, n);
  check_dtype(op, x_dtype, "x", false);
  check_dtype(op, res_dtype, "residual", true);
  check_dtype(op, y_dtype, "y", false);
  if (!x || !y || !weight || !rstd) fail(op, "x, y, weight and rstd are required");
  if (!rms && (!bias || !mean)) fail(op, "layer norm needs bias and mean");
  if ((res != 0) != (res_dtype != kNormNone) || (res != 0) != (res_out != 0))
    fail(op, "residual, its output and its dtype go together");
  const CuteNormEntry* e = find(0, !rms, n, x_dtype, res_dtype, y_dtype, false);
  for (uintptr_t p : {x, res, res_out, y, weight, bias})
    if (!aligned16(p)) e = nullptr;
  CuteNormArgs a;
  set_dropout(op, a, keep, seed, seed_ptr, offset, offset_ptr);
  if (keep != 1.0 && !res) fail(op, "dropout applies to x before the residual add: it needs a residual");
  if (!e) return "";
  a.x = reinterpret_cast<const void*>(x);
  a.res = reinterpret_cast<const void*>(res);
  a.res_out = reinterpret_cast<void*>(res_out);
  a.y = reinterpret_cast<void*>(y);
  a.weight = reinterpret_cast<const void*>(weight);
  a.bias = reinterpret_cast<const void*>(bias);
  a.mean = reinterpret_cast<void*>(mean);
  a.rstd = reinterpret_cast<void*>(rstd);
  a.rows = rows;
  a.n = n;
  a.eps = static_cast<float>(eps);
  return run(e, a, stream);
}

std::string norm_bwd(uintptr_t s, uintptr_t dy, uintptr_t dres, uintptr_t ds, uintptr_t dx2, uintptr_t weight,
                     uintptr_t mean, uintptr_t rstd, uintptr_t pw, uintptr_t pb, uintptr_t pc, int64_t partial_rows,
                     int64_t rows, int64_t n, int s_dtype, int dy_dtype, int dx2_dtype, bool rms, uintptr_t stream,
                     double keep, uint64_t seed, uintptr_t seed_ptr, uint64_t offset, uintptr_t offset_ptr) {
  const char* op = "cute_norm_backward";
  check_sizes(op, rows, n);
  check_dtype(op, s_dtype, "s", false);
  check_dtype(op, dy_dtype, "dy", false);
  check_dtype(op, dx2_dtype, "dx2", true);
  if (!s || !dy || !ds || !weight || !rstd || !pw || !pc)
    fail(op, "s, dy, ds, weight, rstd and the dweight and dx partials are required");
  if (!rms && (!mean || !pb)) fail(op, "layer norm needs mean and the dbias partials");
  if ((dx2 != 0) != (dx2_dtype != kNormNone)) fail(op, "dx2 and its dtype go together");
  if (partial_rows < 1 || partial_rows > 65535) fail(op, "partial_rows must be in [1, 65535]");
  const CuteNormEntry* e = find(1, !rms, n, s_dtype, dx2_dtype, dy_dtype, dres != 0);
  for (uintptr_t p : {s, dy, dres, ds, dx2, weight, pw, pb, pc})
    if (!aligned16(p)) e = nullptr;
  CuteNormArgs a;
  set_dropout(op, a, keep, seed, seed_ptr, offset, offset_ptr);
  // Only the kernels writing dx2 (x's own gradient) apply the dropout; the caller composes it elsewhere.
  if (keep != 1.0 && !dx2) return "";
  if (!e) return "";
  a.x = reinterpret_cast<const void*>(s);
  a.dy = reinterpret_cast<const void*>(dy);
  a.dres = reinterpret_cast<const void*>(dres);
  a.ds = reinterpret_cast<void*>(ds);
  a.dx2 = reinterpret_cast<void*>(dx2);
  a.weight = reinterpret_cast<const void*>(weight);
  a.mean = reinterpret_cast<void*>(mean);
  a.rstd = reinterpret_cast<void*>(rstd);
  a.pw = reinterpret_cast<void*>(pw);
  a.pb = reinterpret_cast<void*>(pb);
  a.pc = reinterpret_cast<void*>(pc);
  a.partial_rows = static_cast<int32_t>(partial_rows);
  a.rows = rows;
  a.n = n;
  return run(e, a, stream);
}

std::string norm_finish(uintptr_t pw, uintptr_t pb, uintptr_t pc, uintptr_t dweight, uintptr_t dbias,
                        uintptr_t dcol, int64_t partial_rows, int64_t n, bool rms, uintptr_t stream) {
  const char* op = "cute_norm_finish";
  check_sizes(op, partial_rows, n);
  if (!pw || !dweight || !pc || !dcol) fail(op, "the dweight and dx partials, dweight and dcol are required");
  if (!rms && (!pb || !dbias)) fail(op, "layer norm needs the dbias partials and dbias");
  const CuteNormEntry* e = find(2, !rms, 0, kNormNone, kNormNone, kNormNone, false);
  if (!e) return "";
  CuteNormArgs a;
  a.pw = reinterpret_cast<void*>(pw);
  a.pb = reinterpret_cast<void*>(pb);
  a.pc = reinterpret_cast<void*>(pc);
  a.dweight = reinterpret_cast<void*>(dweight);
  a.dbias = reinterpret_cast<void*>(dbias);
  a.dcol = reinterpret_cast<void*>(dcol);
  a.partial_rows = static_cast<int32_t>(partial_rows);
  a.rows = partial_rows;
  a.n = n;
  return run(e, a, stream);
}

std::vector<std::map<std::string, std::string>> norm_specializations() {
  static const char* stages[] = {"fwd", "bwd", "finish"};
  static const char* dtypes[] = {"", "bf16", "fp32"};
  std::vector<std::map<std::string, std::string>> out;
  for (int i = 0; i < kNumCuteNormKernels; ++i) {
    const CuteNormEntry& e = kCuteNormKernels[i];
    out.push_back({{"name", e.name}, {"stage", stages[e.stage]}, {"kind", e.layer ? "layer" : "rms"},
                   {"n", std::to_string(e.n)}, {"x_dtype", dtypes[e.x_dtype]}, {"res_dtype", dtypes[e.res_dtype]},
                   {"out_dtype", dtypes[e.out_dtype]}, {"has_dres", e.has_dres ? "1" : "0"},
                   {"slots", std::to_string(e.slots)}, {"sm", std::to_string(e.sm)}});
  }
  return out;
}

void add_functions(nb::module_& m) {
  m.def("cute_norm", &norm_fwd, nb::arg("x"), nb::arg("res"), nb::arg("res_out"), nb::arg("y"), nb::arg("weight"),
        nb::arg("bias"), nb::arg("mean"), nb::arg("rstd"), nb::arg("rows"), nb::arg("n"), nb::arg("x_dtype"),
        nb::arg("res_dtype"), nb::arg("y_dtype"), nb::arg("rms"), nb::arg("eps"), nb::arg("stream"),
        nb::arg("keep") = 1.0, nb::arg("seed") = 0, nb::arg("seed_ptr") = 0, nb::arg("offset") = 0,
        nb::arg("offset_ptr") = 0,
        "Fused (residual add +) LayerNorm/RMSNorm forward on contiguous rows, with keep < 1 the residual dropout "
        "of x (Philox state as _C.dropout's); returns the kernel name or ''.");
  m.def("cute_norm_backward", &norm_bwd, nb::arg("s"), nb::arg("dy"), nb::arg("dres"), nb::arg("ds"), nb::arg("dx2"),
        nb::arg("weight"), nb::arg("mean"), nb::arg("rstd"), nb::arg("pw"), nb::arg("pb"), nb::arg("pc"),
        nb::arg("partial_rows"), nb::arg("rows"), nb::arg("n"), nb::arg("s_dtype"), nb::arg("dy_dtype"),
        nb::arg("dx2_dtype"), nb::arg("rms"), nb::arg("stream"), nb::arg("keep") = 1.0, nb::arg("seed") = 0,
        nb::arg("seed_ptr") = 0, nb::arg("offset") = 0, nb::arg("offset_ptr") = 0,
        "Fused norm backward (ds, optional second ds, dweight/dbias/dx-column-sum partials), with keep < 1 dx2 "
        "through the forward's residual dropout; returns the kernel name or ''.");
  m.def("cute_norm_finish", &norm_finish,
        "Sum the per-CTA dweight/dbias/dx-column-sum partials; returns the kernel name or ''.");
  m.def("cute_norm_specializations", &norm_specializations, "The built CuTeDSL norm specializations.");
}

static Bindings reg(&add_functions, &load_norm_modules);

}  // namespace
}  // namespace cutegrad
