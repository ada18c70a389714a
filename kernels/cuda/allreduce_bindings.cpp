// nanobind entry points of the CuTeDSL all-reduce (kernels/cute/allreduce.py).
//
// _C.allreduce(algo, dtype, inp, out, flags, data, rank, world, n, cap, stream)
// checks every argument (a Python ValueError naming it, before any launch),
// picks the specialization compiled for the current device's compute
// capability (sm_90a on Hopper, sm_103a on Blackwell Ultra) and enqueues it on
// `stream`.  It returns the kernel's name.  The workspace pointers come from
// frontend/distributed/symmetric.py; the Python side is
// frontend/distributed/cute_backend.py.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "allreduce_args.h"
#include "bindings.h"

namespace nb = nanobind;

namespace cutegrad {
namespace {

[[noreturn]] void fail(const std::string& msg) { throw nb::value_error(("allreduce: " + msg).c_str()); }

int current_sm() {
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error("allreduce: no CUDA device");
  }
  return major * 10 + minor;
}

int element_bytes(ArDType t) { return t == ArDType::fp32 ? 4 : 2; }

ArDType parse_dtype(const std::string& s) {
  if (s == "bf16") return ArDType::bf16;
  if (s == "fp16") return ArDType::fp16;
  if (s == "fp32") return ArDType::fp32;
  fail("dtype must be bf16, fp16 or fp32, got '" + s + "'");
}

void check_aligned(uintptr_t p, const std::string& what) {
  if (p == 0) fail(what + " is a null pointer");
  if (p % 16) fail(what + " is not 16-byte aligned");
}

const AllReduceKernelEntry* find(bool two_shot, ArDType dt, int sm) {
  for (int i = 0; i < kNumAllReduceKernels; ++i) {
    const AllReduceKernelEntry& e = kAllReduceKernels[i];
    if (e.launch && e.two_shot == two_shot && e.dtype == dt && e.sm == sm) return &e;
  }
  return nullptr;
}

std::string allreduce(const std::string& algo, const std::string& dtype, uintptr_t in, uintptr_t out,
                      const std::vector<uintptr_t>& flags, const std::vector<uintptr_t>& data, int rank, int world,
                      int64_t n, int64_t cap, uintptr_t stream) {
  if (algo != "one_shot" && algo != "two_shot") fail("algo must be one_shot or two_shot, got '" + algo + "'");
  ArDType dt = parse_dtype(dtype);
  if (world < 2 || world > kAllReduceMaxRanks)
    fail("world size " + std::to_string(world) + " is outside [2, " + std::to_string(kAllReduceMaxRanks) + "]");
  if (rank < 0 || rank >= world) fail("rank " + std::to_string(rank) + " is outside [0, world)");
  if ((int)flags.size() != world || (int)data.size() != world)
    fail("flags and data must hold one pointer per rank (" + std::to_string(world) + "), got " +
         std::to_string(flags.size()) + " and " + std::to_string(data.size()));
  const int vec = 16 / element_bytes(dt);
  if (n < 0 || n % vec) fail("n = " + std::to_string(n) + " is not a multiple of " + std::to_string(vec) +
                             " elements (16 bytes)");
  if (n > cap) fail("n = " + std::to_string(n) + " exceeds the workspace capacity " + std::to_string(cap));
  if (cap % vec || cap / vec > INT32_MAX) fail("bad workspace capacity " + std::to_string(cap));
  check_aligned(in, "input");
  check_aligned(out, "output");
  AllReduceArgs a{};
  for (int p = 0; p < kAllReduceMaxRanks; ++p) {
    int q = p < world ? p : rank;  // unused slots repeat this rank's own workspace
    check_aligned(flags[q], "flags[" + std::to_string(q) + "]");
    check_aligned(data[q], "data[" + std::to_string(q) + "]");
    a.flags[p] = reinterpret_cast<void*>(flags[q]);
    a.data[p] = reinterpret_cast<void*>(data[q]);
  }
  a.in = reinterpret_cast<void*>(in);
  a.out = reinterpret_cast<void*>(out);
  a.rank = rank;
  a.world = world;
  a.n_vec = static_cast<int32_t>(n / vec);
  a.cap_vec = static_cast<int32_t>(cap / vec);
  int sm = current_sm();
  const AllReduceKernelEntry* e = find(algo == "two_shot", dt, sm);
  if (!e) fail("no " + algo + " " + dtype + " kernel was built for sm_" + std::to_string(sm) +
               " (CUTEGRAD_CUDA_ARCHS at build time)");
  if (n == 0) return e->name;
  int err = e->launch(a, reinterpret_cast<void*>(stream));
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("allreduce: launch of ") + e->name + " failed: " +
                             cudaGetErrorString(static_cast<cudaError_t>(err)));
  }
  return e->name;
}

std::vector<std::tuple<std::string, std::string, std::string, int>> allreduce_kernels() {
  static const char* names[] = {"bf16", "fp16", "fp32"};
  std::vector<std::tuple<std::string, std::string, std::string, int>> out;
  for (int i = 0; i < kNumAllReduceKernels; ++i) {
    const AllReduceKernelEntry& e = kAllReduceKernels[i];
    if (e.launch)
      out.emplace_back(e.name, e.two_shot ? "two_shot" : "one_shot", names[static_cast<int>(e.dtype)], e.sm);
  }
  return out;
}

void add_functions(nb::module_& m) {
  m.def("allreduce", &allreduce, nb::arg("algo"), nb::arg("dtype"), nb::arg("inp"), nb::arg("out"),
        nb::arg("flags"), nb::arg("data"), nb::arg("rank"), nb::arg("world"), nb::arg("n"), nb::arg("cap"),
        nb::arg("stream"),
        "In-node all-reduce over a symmetric workspace (kernels/cute/allreduce.py); returns the kernel's name.");
  m.def("allreduce_kernels", &allreduce_kernels, "(name, algo, dtype, sm) of every built all-reduce kernel.");
}

// Loads only the cubins of the current device's architecture: an sm_103a
// module cannot load on an sm_90 device and vice versa.
int load_modules() {
  int sm = 0;
  try {
    sm = current_sm();
  } catch (const std::exception&) {
    return 0;  // no device: nothing to load; a launch would raise
  }
  int first = 0;
  for (int i = 0; i < kNumAllReduceKernels; ++i) {
    const AllReduceKernelEntry& e = kAllReduceKernels[i];
    if (!e.load || e.sm != sm) continue;
    int err = 0;
    e.load(&err);
    if (err != 0 && first == 0) first = err;
  }
  return first;
}

Bindings g_allreduce_bindings(&add_functions, &load_modules);
}  // namespace
}  // namespace cutegrad
