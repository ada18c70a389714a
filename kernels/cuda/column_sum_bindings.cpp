// nanobind entry point of the one-launch column sum (column_sum.cu): `_C.column_sum`.
// Checks everything the kernel assumes and raises ValueError naming the mismatch
// before launching; a failed launch raises RuntimeError.
#include <nanobind/nanobind.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings.h"
#include "column_sum_args.h"
#include "ops_args.h"

namespace nb = nanobind;

namespace cutegrad {
namespace ops {
namespace {

[[noreturn]] void fail(const std::string& msg) { throw nb::value_error(("column_sum: " + msg).c_str()); }

bool floating(int dtype) { return dtype == kF16 || dtype == kBF16 || dtype == kF32 || dtype == kF64; }

void column_sum(uintptr_t in, int in_dtype, uintptr_t out, int out_dtype, int64_t rows, int64_t cols, int splits,
                uintptr_t partials, uintptr_t counters, uintptr_t stream) {
  if (!floating(in_dtype) || !floating(out_dtype))
    fail("input dtype code " + std::to_string(in_dtype) + " and output dtype code " + std::to_string(out_dtype) +
         " must both be floating point (f16, bf16, f32, f64)");
  if (rows < 0 || cols < 0) fail("negative extent (" + std::to_string(rows) + ", " + std::to_string(cols) + ")");
  if (cols >= (int64_t(1) << 31)) fail("more than 2^31 - 1 columns");
  if (splits < 1 || splits > 65535) fail("splits must be in [1, 65535], got " + std::to_string(splits));
  if (cols == 0) return;
  if (out == 0 || (rows > 0 && in == 0)) fail("input or output is a null pointer");
  if (splits > 1 && (partials == 0 || counters == 0)) fail("splits > 1 needs the partials and counters buffers");
  if (partials % 8 || counters % 4) fail("partials must be 8-byte and counters 4-byte aligned");
  ColumnSumArgs a{};
  a.in = reinterpret_cast<const void*>(in);
  a.in_dtype = in_dtype;
  a.out = reinterpret_cast<void*>(out);
  a.out_dtype = out_dtype;
  a.rows = rows;
  a.cols = cols;
  a.splits = splits;
  a.partials = reinterpret_cast<void*>(partials);
  a.counters = reinterpret_cast<unsigned int*>(counters);
  const int err = column_sum_launch(a, reinterpret_cast<void*>(stream));
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("cutegrad._C: launch of column_sum failed: ") +
                             cudaGetErrorString(static_cast<cudaError_t>(err)));
}

void add_functions(nb::module_& m) {
  m.def("column_sum", &column_sum, nb::arg("input"), nb::arg("in_dtype"), nb::arg("output"), nb::arg("out_dtype"),
        nb::arg("rows"), nb::arg("cols"), nb::arg("splits"), nb::arg("partials"), nb::arg("counters"),
        nb::arg("stream"),
        "Sum over the rows of a contiguous (rows, cols) matrix in one deterministic launch (a bias gradient); "
        "splits > 1 takes an accumulator workspace of splits * cols and a zeroed counter per 32 columns, which "
        "the launch leaves zeroed.");
}

}  // namespace

static Bindings reg(&add_functions, nullptr);

}  // namespace ops
}  // namespace cutegrad
