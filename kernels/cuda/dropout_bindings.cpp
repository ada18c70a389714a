// nanobind entry point of the fused dropout kernel (dropout.cu): `_C.dropout`.
// Checks everything the kernel assumes and raises ValueError naming the
// mismatch before launching; a failed launch raises RuntimeError.
#include <nanobind/nanobind.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings.h"
#include "dropout_args.h"
#include "ops_args.h"

namespace nb = nanobind;

namespace cutegrad {
namespace ops {
namespace {

[[noreturn]] void fail(const std::string& msg) { throw nb::value_error(("dropout: " + msg).c_str()); }

void dropout(uintptr_t in, uintptr_t out, int dtype, int64_t n, uint64_t seed, uintptr_t seed_ptr, uint64_t offset,
             uintptr_t offset_ptr, double keep, uintptr_t stream) {
  if (dtype != kF16 && dtype != kBF16 && dtype != kF32 && dtype != kF64)
    fail("dtype code " + std::to_string(dtype) + " is not floating point (f16, bf16, f32, f64)");
  if (n < 0) fail("negative element count " + std::to_string(n));
  if (!(keep > 0.0 && keep <= 1.0)) fail("keep probability must be in (0, 1], got " + std::to_string(keep));
  if (offset % 4) fail("Philox offset must be a multiple of 4, got " + std::to_string(offset));
  if (seed_ptr % 8 || offset_ptr % 8) fail("seed/offset pointers must be 8-byte aligned");
  if (n == 0) return;
  if (in == 0 || out == 0) fail("input or output is a null pointer");
  DropoutArgs a{};
  a.in = reinterpret_cast<const void*>(in);
  a.out = reinterpret_cast<void*>(out);
  a.dtype = dtype;
  a.n = n;
  a.seed = seed;
  a.seed_ptr = reinterpret_cast<const void*>(seed_ptr);
  a.offset = offset;
  a.offset_ptr = reinterpret_cast<const void*>(offset_ptr);
  a.keep = static_cast<float>(keep);
  a.scale = 1.0 / keep;
  const int err = dropout_launch(a, reinterpret_cast<void*>(stream));
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("cutegrad._C: launch of dropout failed: ") +
                             cudaGetErrorString(static_cast<cudaError_t>(err)));
}

void add_functions(nb::module_& m) {
  m.def("dropout", &dropout, nb::arg("input"), nb::arg("output"), nb::arg("dtype"), nb::arg("n"), nb::arg("seed"),
        nb::arg("seed_ptr"), nb::arg("offset"), nb::arg("offset_ptr"), nb::arg("keep"), nb::arg("stream"),
        "Fused dropout of a contiguous tensor: out = in / keep where the Philox value of (seed, offset) is kept, "
        "else 0 (the same call on dy with the forward's seed and offset is the backward).");
}

}  // namespace

static Bindings reg(&add_functions, nullptr);

}  // namespace ops
}  // namespace cutegrad
