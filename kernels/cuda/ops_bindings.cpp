// nanobind entry points of the CUDA C++ kernels other than GEMM (elementwise,
// reductions, softmax, norms, gather/scatter, random, fused optimizers).
//
// Every entry validates its arguments (dtype codes, stride/shape ranks,
// null pointers, overlapping outputs, unsupported combinations) and raises a
// Python exception naming the mismatch before anything is launched; CUDA
// errors of the launch raise RuntimeError naming the kernel.  Work is queued
// on the stream handle passed in and never synchronised.  Shapes arrive
// uncoalesced; this file merges dimensions so kernels see as few as possible.
// The Python side is frontend/backends/cuda.py; argument contracts are in
// docs/cuda_ops.md.
#include <nanobind/nanobind.h>
#include <nanobind/stl/vector.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "bindings.h"
#include "ops_args.h"

namespace nb = nanobind;

namespace cutegrad {
namespace ops {
namespace {

using Dims = std::vector<int64_t>;

[[noreturn]] void fail(const char* op, const std::string& msg) {
  throw nb::value_error((std::string(op) + ": " + msg).c_str());
}

void check_cuda(int err, const char* kernel) {
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("cutegrad._C: launch of ") + kernel + " failed: " +
                             cudaGetErrorName(static_cast<cudaError_t>(err)) + ": " +
                             cudaGetErrorString(static_cast<cudaError_t>(err)));
  }
}

void check_dtype(const char* op, int dtype, const char* what) {
  if (dtype < 0 || dtype >= kNumDTypes)
    fail(op, std::string(what) + " has an unknown dtype code " + std::to_string(dtype) + " (expected 0..9)");
}

void check_rank(const char* op, const Dims& strides, size_t ndim, const char* what) {
  if (strides.size() != ndim)
    fail(op, std::string(what) + " has " + std::to_string(strides.size()) + " strides for a " + std::to_string(ndim) +
                 "-d shape");
}

void check_ptr(const char* op, uintptr_t p, const char* what) {
  if (p == 0) fail(op, std::string(what) + " is a null pointer");
}

int64_t numel_of(const char* op, const Dims& shape) {
  int64_t n = 1;
  for (size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] < 0) fail(op, "negative extent " + std::to_string(shape[d]) + " in dimension " + std::to_string(d));
    n *= shape[d];
  }
  return n;
}

void check_output(const char* op, const Dims& shape, const Dims& strides) {
  for (size_t d = 0; d < shape.size(); ++d)
    if (shape[d] > 1 && strides[d] == 0)
      fail(op, "output has stride 0 in dimension " + std::to_string(d) + " of extent " + std::to_string(shape[d]) +
                   ": its elements would overlap");
}

void check_compute(const char* op, int compute) {
  if (compute < kComputeF32 || compute > kComputeI64)
    fail(op, "unknown compute type " + std::to_string(compute) + " (expected 0 fp32, 1 fp64, 2 int64)");
}

// Dimensions of one iteration space with the strides of several operands;
// drops extent-1 dimensions and merges neighbours contiguous for every operand.
struct Space {
  int ndim = 0;
  int64_t sizes[kMaxDims];
  int64_t* strides[4];  // operand k's strides, filled in place
};

void coalesce(const char* op, const Dims& shape, const std::vector<const Dims*>& in_strides, int64_t* out_sizes,
              int64_t* const* out_strides, int* out_ndim) {
  const size_t n_ops = in_strides.size();
  int64_t sizes[64];
  int64_t st[4][64];
  if (shape.size() > 64) fail(op, "more than 64 dimensions");
  int nd = 0;
  for (size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] == 1) continue;
    sizes[nd] = shape[d];
    for (size_t k = 0; k < n_ops; ++k) st[k][nd] = (*in_strides[k])[d];
    ++nd;
  }
  // merge from the innermost dimension outwards
  int64_t msizes[64];
  int64_t mst[4][64];
  int m = 0;
  for (int d = nd - 1; d >= 0; --d) {
    bool merge = m > 0;
    for (size_t k = 0; merge && k < n_ops; ++k) merge = st[k][d] == mst[k][m - 1] * msizes[m - 1];
    if (merge) {
      msizes[m - 1] *= sizes[d];
    } else {
      msizes[m] = sizes[d];
      for (size_t k = 0; k < n_ops; ++k) mst[k][m] = st[k][d];
      ++m;
    }
  }
  if (m > kMaxDims)
    fail(op, "needs " + std::to_string(m) + " dimensions after merging contiguous ones; at most " +
                 std::to_string(kMaxDims) + " are supported (make an operand contiguous first)");
  for (int i = 0; i < m; ++i) {
    out_sizes[i] = msizes[m - 1 - i];
    for (size_t k = 0; k < n_ops; ++k) out_strides[k][i] = mst[k][m - 1 - i];
  }
  *out_ndim = m;
}

void set_scalar(Operand& op, nb::handle v, const char* opname, const char* what) {
  op.is_scalar = 1;
  op.data = nullptr;
  if (PyBool_Check(v.ptr())) {
    op.scalar_i = v.ptr() == Py_True ? 1 : 0;
    op.scalar_f = static_cast<double>(op.scalar_i);
  } else if (PyLong_Check(v.ptr())) {
    int overflow = 0;
    long long i = PyLong_AsLongLongAndOverflow(v.ptr(), &overflow);
    if (overflow) fail(opname, std::string(what) + " does not fit in int64");
    op.scalar_i = i;
    op.scalar_f = static_cast<double>(i);
  } else if (PyFloat_Check(v.ptr())) {
    op.scalar_f = PyFloat_AsDouble(v.ptr());
    double f = op.scalar_f;
    op.scalar_i = (f == f && f > -9.2e18 && f < 9.2e18) ? static_cast<int64_t>(f) : 0;
  } else {
    fail(opname, std::string(what) + " must be a tensor or a Python number");
  }
}

// ---- elementwise ----------------------------------------------------------

const char* family_name(int f) {
  switch (f) {
    case kUnary: return "unary";
    case kBinary: return "binary";
    case kWhere: return "where";
    case kClamp: return "clamp";
    case kActBackward: return "act_backward";
    case kCopy: return "copy";
    default: return "arange";
  }
}

// Operand k: dtype -1 absent, -2 a Python scalar in `scalar`; else a tensor at ptr with strides.
void elementwise(int family, int code, int compute, const Dims& shape, uintptr_t out, int out_dtype,
                 const Dims& out_strides, uintptr_t x, int x_dtype, const Dims& x_strides, nb::handle x_scalar,
                 uintptr_t y, int y_dtype, const Dims& y_strides, nb::handle y_scalar, uintptr_t z, int z_dtype,
                 const Dims& z_strides, nb::handle z_scalar, nb::handle lo, nb::handle hi, uintptr_t stream) {
  if (family < kUnary || family > kArange) throw nb::value_error(("elementwise: unknown family " + std::to_string(family)).c_str());
  const char* op = family_name(family);
  const int expected_inputs[] = {1, 2, 3, 1, 2, 1, 0};
  if (family == kUnary && !(code >= codes::NEG && code <= codes::ISFINITE))
    fail(op, "unknown unary code " + std::to_string(code));
  if (family == kBinary && !(code >= codes::ADD && code <= codes::ATAN2))
    fail(op, "unknown binary code " + std::to_string(code));
  if (family == kActBackward && code != codes::GELU && code != codes::GELU_TANH && code != codes::SILU)
    fail(op, "no backward rule for activation code " + std::to_string(code) + " (GELU, GELU_TANH, SILU only)");
  check_compute(op, compute);
  if ((family == kActBackward) && compute == kComputeI64) fail(op, "needs a floating compute type");
  check_dtype(op, out_dtype, "output");
  check_rank(op, out_strides, shape.size(), "output");
  const int64_t numel = numel_of(op, shape);
  check_output(op, shape, out_strides);

  ElementwiseArgs a{};
  a.family = family;
  a.code = code;
  a.compute = compute;
  a.out = reinterpret_cast<void*>(out);
  a.out_dtype = out_dtype;
  a.numel = numel;
  const uintptr_t ptrs[3] = {x, y, z};
  const int dtypes[3] = {x_dtype, y_dtype, z_dtype};
  const Dims* strides[3] = {&x_strides, &y_strides, &z_strides};
  const nb::handle scalars[3] = {x_scalar, y_scalar, z_scalar};
  const char* names[3] = {"first input", "second input", "third input"};
  std::vector<const Dims*> tensor_strides{&out_strides};
  int64_t* strides_out[4] = {a.out_strides, nullptr, nullptr, nullptr};
  int nin = 0;
  for (int k = 0; k < 3; ++k) {
    if (dtypes[k] == -1) break;
    Operand& o = a.in[k];
    ++nin;
    if (dtypes[k] == -2) {
      set_scalar(o, scalars[k], op, names[k]);
      o.dtype = -2;
      continue;
    }
    check_dtype(op, dtypes[k], names[k]);
    check_rank(op, *strides[k], shape.size(), names[k]);
    if (numel) check_ptr(op, ptrs[k], names[k]);
    o.data = reinterpret_cast<const void*>(ptrs[k]);
    o.dtype = dtypes[k];
    strides_out[tensor_strides.size()] = o.strides;
    tensor_strides.push_back(strides[k]);
  }
  if (nin != expected_inputs[family])
    fail(op, "expects " + std::to_string(expected_inputs[family]) + " inputs, got " + std::to_string(nin));
  a.nin = nin;
  if (family == kClamp) {
    a.has_lo = !lo.is_none();
    a.has_hi = !hi.is_none();
    Operand tmp{};
    if (a.has_lo) { set_scalar(tmp, lo, op, "min"); a.p0 = tmp.scalar_f; a.i0 = tmp.scalar_i; }
    if (a.has_hi) { set_scalar(tmp, hi, op, "max"); a.p1 = tmp.scalar_f; a.i1 = tmp.scalar_i; }
  } else if (family == kArange) {
    Operand tmp{};
    set_scalar(tmp, lo, op, "start");
    a.p0 = tmp.scalar_f; a.i0 = tmp.scalar_i;
    set_scalar(tmp, hi, op, "step");
    a.p1 = tmp.scalar_f; a.i1 = tmp.scalar_i;
    if (shape.size() != 1 || out_strides[0] != 1) fail(op, "output must be 1-d and contiguous");
  }
  if (numel == 0) return;
  check_ptr(op, out, "output");
  if (family == kArange) {
    a.ndim = 1;
    a.sizes[0] = numel;
    a.out_strides[0] = 1;
  } else {
    coalesce(op, shape, tensor_strides, a.sizes, strides_out, &a.ndim);
  }
  check_cuda(elementwise_launch(a, reinterpret_cast<void*>(stream)), op);
}

// ---- reductions -----------------------------------------------------------

void check_workspace(const char* op, uintptr_t workspace, int64_t workspace_bytes) {
  if (workspace_bytes < 0) fail(op, "negative workspace size " + std::to_string(workspace_bytes));
  if (workspace_bytes > 0 && workspace == 0) fail(op, "workspace is a null pointer but its size is nonzero");
}

void reduce(int code, int compute, uintptr_t x, int x_dtype, const Dims& shape, const Dims& strides,
            const std::vector<int>& dims, uintptr_t out, int out_dtype, double correction, uintptr_t workspace,
            int64_t workspace_bytes, uintptr_t stream) {
  const char* op = "reduce";
  const bool known = (code >= kSum && code <= kArgMin) || code == kVar || code == kLogSumExp;
  if (!known) fail(op, "unknown reduction code " + std::to_string(code));
  check_compute(op, compute);
  if ((code == kVar || code == kLogSumExp) && compute == kComputeI64) fail(op, "var/logsumexp need a floating compute type");
  check_dtype(op, x_dtype, "input");
  check_dtype(op, out_dtype, "output");
  if ((code == kArgMax || code == kArgMin) && out_dtype != kI64) fail(op, "argmax/argmin write int64 indices");
  check_rank(op, strides, shape.size(), "input");
  numel_of(op, shape);
  std::vector<bool> reduced(shape.size(), false);
  for (int d : dims) {
    if (d < 0 || d >= static_cast<int>(shape.size()))
      fail(op, "dimension " + std::to_string(d) + " out of range for a " + std::to_string(shape.size()) + "-d input");
    if (reduced[d]) fail(op, "dimension " + std::to_string(d) + " listed twice");
    reduced[d] = true;
  }
  Dims kept_shape, kept_strides, red_shape, red_strides;
  for (size_t d = 0; d < shape.size(); ++d) {
    (reduced[d] ? red_shape : kept_shape).push_back(shape[d]);
    (reduced[d] ? red_strides : kept_strides).push_back(strides[d]);
  }
  ReduceArgs a{};
  a.in = reinterpret_cast<const void*>(x);
  a.in_dtype = x_dtype;
  a.out = reinterpret_cast<void*>(out);
  a.out_dtype = out_dtype;
  a.code = code;
  a.compute = compute;
  a.correction = correction;
  check_workspace(op, workspace, workspace_bytes);
  a.workspace = reinterpret_cast<void*>(workspace);
  a.workspace_bytes = workspace_bytes;
  a.n_out = numel_of(op, kept_shape);
  a.n_reduce = numel_of(op, red_shape);
  if (a.n_out == 0) return;
  if (a.n_reduce == 0 && (code == kMax || code == kMin || code == kArgMax || code == kArgMin))
    fail(op, "max/min/argmax/argmin of an empty reduction has no identity");
  check_ptr(op, out, "output");
  if (a.n_reduce) check_ptr(op, x, "input");
  int64_t* ks[1] = {a.kept_strides};
  int64_t* rs[1] = {a.red_strides};
  coalesce(op, kept_shape, {&kept_strides}, a.kept_sizes, ks, &a.n_kept);
  coalesce(op, red_shape, {&red_strides}, a.red_sizes, rs, &a.n_red);
  auto inner_stride = [](int n, const int64_t* st) { return n ? (st[n - 1] < 0 ? -st[n - 1] : st[n - 1]) : INT64_MAX; };
  a.inner = a.n_red > 0 && inner_stride(a.n_red, a.red_strides) <= inner_stride(a.n_kept, a.kept_strides);
  check_cuda(reduce_launch(a, reinterpret_cast<void*>(stream)), op);
}

// ---- softmax and norms ----------------------------------------------------

void check_float_dtype(const char* op, int dtype, const char* what) {
  if (dtype != kF16 && dtype != kBF16 && dtype != kF32 && dtype != kF64)
    fail(op, std::string(what) + " must be float16, bfloat16, float32 or float64 (dtype code " +
                 std::to_string(dtype) + ")");
}

void softmax(uintptr_t x, uintptr_t y, int dtype, int64_t outer, int64_t n, int64_t inner, bool log,
             int64_t causal_rows, uintptr_t stream) {
  const char* op = log ? "log_softmax" : "softmax";
  check_float_dtype(op, dtype, "input");
  if (outer < 0 || n < 0 || inner < 0) fail(op, "negative extent");
  if (causal_rows < 0) fail(op, "negative causal row count");
  if (causal_rows > 0 && inner != 1) fail(op, "the causal mask applies along the last dimension only");
  if (causal_rows > 0 && outer % causal_rows != 0)
    fail(op, "row count " + std::to_string(outer) + " is not a multiple of the causal query length " +
                 std::to_string(causal_rows));
  if (outer * n * inner == 0) return;
  check_ptr(op, x, "input");
  check_ptr(op, y, "output");
  SoftmaxArgs a{reinterpret_cast<const void*>(x), reinterpret_cast<void*>(y), dtype, outer, n, inner, log ? 1 : 0,
                causal_rows};
  check_cuda(softmax_launch(a, reinterpret_cast<void*>(stream)), op);
}

void softmax_backward(uintptr_t y, uintptr_t dy, uintptr_t dx, int dtype, int64_t outer, int64_t n, int64_t inner,
                      bool log, uintptr_t stream) {
  const char* op = log ? "log_softmax_backward" : "softmax_backward";
  check_float_dtype(op, dtype, "output");
  if (outer < 0 || n < 0 || inner < 0) fail(op, "negative extent");
  if (outer * n * inner == 0) return;
  check_ptr(op, y, "output");
  check_ptr(op, dy, "grad_output");
  check_ptr(op, dx, "grad_input");
  SoftmaxBackwardArgs a{reinterpret_cast<const void*>(y), reinterpret_cast<const void*>(dy),
                        reinterpret_cast<void*>(dx), dtype, outer, n, inner, log ? 1 : 0};
  check_cuda(softmax_backward_launch(a, reinterpret_cast<void*>(stream)), op);
}

void norm(uintptr_t x, uintptr_t y, int dtype, int64_t rows, int64_t n, uintptr_t weight, int weight_dtype,
          uintptr_t bias, int bias_dtype, uintptr_t mean, uintptr_t rstd, int stat_dtype, double eps, bool rms,
          uintptr_t stream) {
  const char* op = rms ? "rms_norm" : "layer_norm";
  check_float_dtype(op, dtype, "input");
  check_float_dtype(op, stat_dtype, "statistics");
  if (weight) check_float_dtype(op, weight_dtype, "weight");
  if (bias) check_float_dtype(op, bias_dtype, "bias");
  if (rms && bias) fail(op, "rms_norm takes no bias");
  if (rows < 0 || n < 0) fail(op, "negative extent");
  if (rows == 0) return;
  if (n == 0) fail(op, "normalized shape has no elements");
  check_ptr(op, x, "input");
  check_ptr(op, y, "output");
  check_ptr(op, rstd, "rstd");
  if (!rms) check_ptr(op, mean, "mean");
  NormArgs a{};
  a.x = reinterpret_cast<const void*>(x);
  a.y = reinterpret_cast<void*>(y);
  a.dtype = dtype;
  a.weight = reinterpret_cast<const void*>(weight);
  a.weight_dtype = weight_dtype;
  a.bias = reinterpret_cast<const void*>(bias);
  a.bias_dtype = bias_dtype;
  a.mean = rms ? nullptr : reinterpret_cast<void*>(mean);
  a.rstd = reinterpret_cast<void*>(rstd);
  a.stat_dtype = stat_dtype;
  a.rows = rows;
  a.n = n;
  a.eps = eps;
  a.rms = rms ? 1 : 0;
  check_cuda(norm_launch(a, reinterpret_cast<void*>(stream)), op);
}

void norm_backward(uintptr_t dy, uintptr_t x, int dtype, int64_t rows, int64_t n, uintptr_t weight, int weight_dtype,
                   uintptr_t mean, uintptr_t rstd, int stat_dtype, uintptr_t dx, uintptr_t dweight, int dweight_dtype,
                   uintptr_t dbias, int dbias_dtype, bool rms, uintptr_t workspace, int64_t workspace_bytes,
                   uintptr_t stream) {
  const char* op = rms ? "rms_norm_backward" : "layer_norm_backward";
  check_float_dtype(op, dtype, "input");
  check_float_dtype(op, stat_dtype, "statistics");
  if (weight) check_float_dtype(op, weight_dtype, "weight");
  if (dweight) check_float_dtype(op, dweight_dtype, "dweight");
  if (dbias) check_float_dtype(op, dbias_dtype, "dbias");
  if (rms && (mean || dbias)) fail(op, "rms_norm has no mean and no bias");
  if (rows < 0 || n < 0) fail(op, "negative extent");
  check_workspace(op, workspace, workspace_bytes);
  if (n == 0) return;
  if (rows) {
    check_ptr(op, dy, "dy");
    check_ptr(op, x, "x");
    check_ptr(op, dx, "dx");
    check_ptr(op, rstd, "rstd");
    if (!rms) check_ptr(op, mean, "mean");
  }
  NormBackwardArgs a{};
  a.dy = reinterpret_cast<const void*>(dy);
  a.x = reinterpret_cast<const void*>(x);
  a.dtype = dtype;
  a.weight = reinterpret_cast<const void*>(weight);
  a.weight_dtype = weight_dtype;
  a.mean = reinterpret_cast<const void*>(mean);
  a.rstd = reinterpret_cast<const void*>(rstd);
  a.stat_dtype = stat_dtype;
  a.dx = reinterpret_cast<void*>(dx);
  a.dweight = reinterpret_cast<void*>(dweight);
  a.dweight_dtype = dweight_dtype;
  a.dbias = reinterpret_cast<void*>(dbias);
  a.dbias_dtype = dbias_dtype;
  a.rows = rows;
  a.n = n;
  a.rms = rms ? 1 : 0;
  a.workspace = reinterpret_cast<void*>(workspace);
  a.workspace_bytes = workspace_bytes;
  check_cuda(norm_backward_launch(a, reinterpret_cast<void*>(stream)), op);
}

// ---- gather / scatter -----------------------------------------------------

void fill_index_args(const char* op, IndexArgs& a, const Dims& shape, int dim, int64_t dim_size, uintptr_t index,
                     int index_dtype, const Dims& index_strides, const Dims& src_strides, const Dims& dst_strides) {
  if (shape.size() > static_cast<size_t>(kMaxDims))
    fail(op, std::to_string(shape.size()) + " dimensions; at most " + std::to_string(kMaxDims) + " are supported");
  if (dim < 0 || dim >= static_cast<int>(shape.size()))
    fail(op, "dim " + std::to_string(dim) + " out of range for " + std::to_string(shape.size()) + " dimensions");
  if (index_dtype != kI64 && index_dtype != kI32 && index_dtype != kI16 && index_dtype != kI8 && index_dtype != kU8)
    fail(op, "index must be an integer tensor (dtype code " + std::to_string(index_dtype) + ")");
  check_rank(op, index_strides, shape.size(), "index");
  check_rank(op, dst_strides, shape.size(), "destination");
  a.numel = numel_of(op, shape);
  a.ndim = static_cast<int>(shape.size());
  for (size_t d = 0; d < shape.size(); ++d) {
    a.sizes[d] = shape[d];
    a.index_strides[d] = index_strides[d];
    a.dst_strides[d] = dst_strides[d];
    a.src_strides[d] = src_strides.empty() ? 0 : src_strides[d];
  }
  a.dim = dim;
  a.dim_size = dim_size;
  a.index = reinterpret_cast<const void*>(index);
  a.index_dtype = index_dtype;
  if (a.numel) check_ptr(op, index, "index");
}

// error: the device pointer of an IndexErrorRecord, or 0 to skip bad indices unreported.
void set_error_record(IndexArgs& a, uintptr_t error, int error_op, int error_dim) {
  if (error % alignof(IndexErrorRecord)) fail("index error record", "pointer is misaligned");
  a.error = reinterpret_cast<IndexErrorRecord*>(error);
  a.error_op = error_op;
  a.error_dim = error_dim;
}

void gather(const Dims& shape, int dim, int64_t dim_size, uintptr_t index, int index_dtype, const Dims& index_strides,
            uintptr_t src, int src_dtype, const Dims& src_strides, uintptr_t dst, int dst_dtype, const Dims& dst_strides,
            uintptr_t stream, uintptr_t error, int error_op, int error_dim) {
  const char* op = "gather";
  IndexArgs a{};
  set_error_record(a, error, error_op, error_dim);
  check_dtype(op, src_dtype, "source");
  check_dtype(op, dst_dtype, "destination");
  if (src_dtype != dst_dtype) fail(op, "source and destination dtypes differ");
  check_rank(op, src_strides, shape.size(), "source");
  fill_index_args(op, a, shape, dim, dim_size, index, index_dtype, index_strides, src_strides, dst_strides);
  check_output(op, shape, dst_strides);
  if (!a.numel) return;
  check_ptr(op, dst, "destination");
  if (dim_size) check_ptr(op, src, "source");
  a.src = reinterpret_cast<const void*>(src);
  a.src_dtype = src_dtype;
  a.dst = reinterpret_cast<void*>(dst);
  a.dst_dtype = dst_dtype;
  check_cuda(gather_launch(a, reinterpret_cast<void*>(stream)), op);
}

// src_dtype -2: `scalar` is written (or added) at every position.
void scatter(const Dims& shape, int dim, int64_t dim_size, uintptr_t index, int index_dtype, const Dims& index_strides,
             uintptr_t src, int src_dtype, const Dims& src_strides, nb::handle scalar, uintptr_t dst, int dst_dtype,
             const Dims& dst_strides, bool accumulate, uintptr_t stream, uintptr_t error, int error_op,
             int error_dim) {
  const char* op = accumulate ? "scatter_add" : "scatter";
  IndexArgs a{};
  set_error_record(a, error, error_op, error_dim);
  check_dtype(op, dst_dtype, "destination");
  if (accumulate && !(dst_dtype == kF32 || dst_dtype == kF64 || dst_dtype == kF16 || dst_dtype == kBF16 ||
                      dst_dtype == kI32 || dst_dtype == kI64))
    fail(op, "accumulation supports float16/bfloat16/float32/float64/int32/int64 destinations (dtype code " +
                 std::to_string(dst_dtype) + ")");
  if (src_dtype == -2) {
    Operand tmp{};
    set_scalar(tmp, scalar, op, "value");
    a.src_is_scalar = 1;
    a.scalar_f = tmp.scalar_f;
    a.scalar_i = tmp.scalar_i;
    fill_index_args(op, a, shape, dim, dim_size, index, index_dtype, index_strides, Dims(), dst_strides);
  } else {
    check_dtype(op, src_dtype, "source");
    check_rank(op, src_strides, shape.size(), "source");
    fill_index_args(op, a, shape, dim, dim_size, index, index_dtype, index_strides, src_strides, dst_strides);
    if (a.numel) check_ptr(op, src, "source");
  }
  if (!a.numel) return;
  if (dim_size) check_ptr(op, dst, "destination");
  a.src = reinterpret_cast<const void*>(src);
  a.src_dtype = src_dtype;
  a.dst = reinterpret_cast<void*>(dst);
  a.dst_dtype = dst_dtype;
  a.accumulate = accumulate ? 1 : 0;
  check_cuda(scatter_launch(a, reinterpret_cast<void*>(stream)), op);
}

void index_add_rows(uintptr_t dst, int dtype, uintptr_t src, uintptr_t index, int64_t n, int64_t rows, int64_t cols,
                    uintptr_t perm, uintptr_t sorted, uintptr_t stream, uintptr_t error, int error_op) {
  const char* op = "index_add_rows";
  if (dtype != kF32 && dtype != kF64) fail(op, "dst/src must be float32 or float64 (dtype code " + std::to_string(dtype) + ")");
  if (n < 0 || rows < 0 || cols < 0) fail(op, "negative extent");
  if (n == 0 || cols == 0) return;
  check_ptr(op, dst, "dst");
  check_ptr(op, src, "src");
  check_ptr(op, index, "index");
  check_ptr(op, perm, "perm scratch");
  check_ptr(op, sorted, "sorted scratch");
  if ((index | perm | sorted) % 8) fail(op, "index and scratch buffers must be aligned int64 arrays");
  if (error % alignof(IndexErrorRecord)) fail(op, "index error record pointer is misaligned");
  IndexAddRowsArgs a{reinterpret_cast<void*>(dst), dtype, reinterpret_cast<const void*>(src),
                     reinterpret_cast<const int64_t*>(index), n, rows, cols, reinterpret_cast<int64_t*>(perm),
                     reinterpret_cast<int64_t*>(sorted), reinterpret_cast<IndexErrorRecord*>(error), error_op};
  check_cuda(index_add_rows_launch(a, reinterpret_cast<void*>(stream)), op);
}

// ---- random ---------------------------------------------------------------

void random_tensor(int kind, uintptr_t out, int dtype, int64_t n, uint64_t seed, uintptr_t seed_ptr, uint64_t offset,
            uintptr_t offset_ptr, double a_, double b_, int64_t low, int64_t range, uintptr_t stream) {
  const char* op = "random";
  if (kind < kUniform || kind > kBernoulliScaled) fail(op, "unknown kind " + std::to_string(kind));
  check_dtype(op, dtype, "output");
  if (n < 0) fail(op, "negative element count");
  if (offset % 4) fail(op, "Philox offset must be a multiple of 4, got " + std::to_string(offset));
  if (kind == kRandint && (range <= 0 || range > (int64_t(1) << 32)))
    fail(op, "randint range must be in [1, 2^32], got " + std::to_string(range));
  if (seed_ptr % 8 || offset_ptr % 8) fail(op, "seed/offset pointers must be 8-byte aligned");
  if (n == 0) return;
  check_ptr(op, out, "output");
  RandomArgs a{};
  a.out = reinterpret_cast<void*>(out);
  a.dtype = dtype;
  a.kind = kind;
  a.n = n;
  a.seed = seed;
  a.seed_ptr = reinterpret_cast<const void*>(seed_ptr);
  a.offset = offset;
  a.offset_ptr = reinterpret_cast<const void*>(offset_ptr);
  a.a = a_;
  a.b = b_;
  a.low = low;
  a.range = range;
  check_cuda(random_launch(a, reinterpret_cast<void*>(stream)), op);
}


// ---- fused optimizers -----------------------------------------------------

using Ptrs = std::vector<uintptr_t>;

// Calls fn(args) for each group of at most kMaxTensorsPerLaunch tensors; returns the total block count.
// steps: empty, or one device fp32 step counter per tensor.
template <typename F>
int64_t for_each_group(const char* op, const Ptrs& params, const Ptrs& grads, const Ptrs& s0, const Ptrs& s1,
                       const Ptrs& steps, const Dims& numels, int param_dtype, int grad_dtype, int64_t chunk,
                       F&& fn) {
  const size_t n = grads.size();
  if (numels.size() != n || (!params.empty() && params.size() != n) || (!s0.empty() && s0.size() != n) ||
      (!s1.empty() && s1.size() != n) || (!steps.empty() && steps.size() != n))
    fail(op, "the tensor lists differ in length (grads " + std::to_string(n) + ", numels " +
                 std::to_string(numels.size()) + ", params " + std::to_string(params.size()) + ", states " +
                 std::to_string(s0.size()) + "/" + std::to_string(s1.size()) + ", steps " +
                 std::to_string(steps.size()) + ")");
  if (chunk <= 0) fail(op, "chunk must be positive");
  check_float_dtype(op, grad_dtype, "gradients");
  if (!params.empty() && param_dtype != kF32 && param_dtype != kF16 && param_dtype != kBF16)
    fail(op, "parameters must be float32, float16 or bfloat16 (dtype code " + std::to_string(param_dtype) + ")");
  int64_t total_blocks = 0;
  for (size_t start = 0; start < n; start += kMaxTensorsPerLaunch) {
    MultiTensorArgs a{};
    a.chunk = chunk;
    a.param_dtype = param_dtype;
    a.grad_dtype = grad_dtype;
    const size_t end = start + kMaxTensorsPerLaunch < n ? start + kMaxTensorsPerLaunch : n;
    for (size_t i = start; i < end; ++i) {
      const int k = a.count++;
      if (numels[i] < 0) fail(op, "tensor " + std::to_string(i) + " has a negative size");
      a.numel[k] = numels[i];
      a.block_start[k + 1] = a.block_start[k] + (numels[i] + chunk - 1) / chunk;
      if (!steps.empty()) {
        // An empty tensor still takes a step (torch counts it too), so its counter is set before the skip.
        if (!steps[i]) fail(op, "step counter " + std::to_string(i) + " is a null pointer");
        a.step[k] = reinterpret_cast<float*>(steps[i]);
      }
      if (numels[i] == 0) continue;
      if (!grads[i]) fail(op, "gradient " + std::to_string(i) + " is a null pointer");
      a.grad[k] = reinterpret_cast<const void*>(grads[i]);
      if (!params.empty()) {
        if (!params[i]) fail(op, "parameter " + std::to_string(i) + " is a null pointer");
        a.param[k] = reinterpret_cast<void*>(params[i]);
      }
      if (!s0.empty()) a.state0[k] = reinterpret_cast<void*>(s0[i]);
      if (!s1.empty()) {
        if (!s1[i] || !s0[i]) fail(op, "optimizer state " + std::to_string(i) + " is a null pointer");
        a.state1[k] = reinterpret_cast<void*>(s1[i]);
      }
    }
    fn(a, total_blocks);
    total_blocks += a.block_start[a.count];
  }
  return total_blocks;
}

// The launch's tensors [first, first + count) of the call, with their low-precision
// copies (shadows: empty, or one pointer per tensor, 0 for none) to write too.
MultiTensorArgs with_shadows(const char* op, const MultiTensorArgs& a, const Ptrs& shadows, int shadow_dtype,
                             size_t& first) {
  MultiTensorArgs b = a;
  if (!shadows.empty()) {
    if (shadow_dtype != kF16 && shadow_dtype != kBF16) fail(op, "shadow copies must be float16 or bfloat16");
    for (int k = 0; k < a.count; ++k) b.shadow[k] = reinterpret_cast<void*>(shadows[first + k]);
    b.shadow_dtype = shadow_dtype;
  }
  first += a.count;
  return b;
}

// steps: empty (use `step`, the count after this update, for every tensor) or
// one device fp32 counter per tensor; increment_step: add 1 to each counter
// (a launch before the update) so the update reads the count after this step.
// lr_ptr: 0, or a device fp32 scalar read instead of lr.
void adamw(const Ptrs& params, const Ptrs& grads, const Ptrs& exp_avgs, const Ptrs& exp_avg_sqs, const Dims& numels,
           int param_dtype, int grad_dtype, double lr, uintptr_t lr_ptr, double beta1, double beta2, double eps,
           double weight_decay, bool decoupled, double step, const Ptrs& steps, bool increment_step,
           uintptr_t grad_scale, bool maximize, int64_t chunk, uintptr_t stream, const Ptrs& shadows,
           int shadow_dtype) {
  const char* op = "adamw";
  if (exp_avgs.size() != grads.size() || exp_avg_sqs.size() != grads.size() || params.size() != grads.size())
    fail(op, "params, grads, exp_avgs and exp_avg_sqs must have the same length");
  if (steps.empty() && step < 1) fail(op, "step must be >= 1 (it is the count after this update)");
  if (steps.empty() && increment_step) fail(op, "increment_step needs device step counters");
  if (!shadows.empty() && shadows.size() != grads.size()) fail(op, "shadows must be empty or one per tensor");
  AdamWHyper h{lr, beta1, beta2, eps, weight_decay, step, reinterpret_cast<const float*>(lr_ptr),
               reinterpret_cast<const float*>(grad_scale), maximize ? 1 : 0, decoupled ? 1 : 0};
  void* s = reinterpret_cast<void*>(stream);
  size_t first = 0;
  for_each_group(op, params, grads, exp_avgs, exp_avg_sqs, steps, numels, param_dtype, grad_dtype, chunk,
                 [&](const MultiTensorArgs& a, int64_t) {
                   if (increment_step) check_cuda(step_increment_launch(a, s), op);
                   check_cuda(adamw_launch(with_shadows(op, a, shadows, shadow_dtype, first), h, s), op);
                 });
}

// momentum_buffers: empty for plain SGD.  lr_ptr: 0, or a device fp32 scalar read instead of lr.
void sgd(const Ptrs& params, const Ptrs& grads, const Ptrs& momentum_buffers, const Dims& numels, int param_dtype,
         int grad_dtype, double lr, uintptr_t lr_ptr, double momentum, double dampening, double weight_decay,
         bool nesterov, bool first_step, uintptr_t grad_scale, bool maximize, int64_t chunk, uintptr_t stream,
         const Ptrs& shadows, int shadow_dtype) {
  const char* op = "sgd";
  if (params.size() != grads.size()) fail(op, "params and grads must have the same length");
  if (!shadows.empty() && shadows.size() != grads.size()) fail(op, "shadows must be empty or one per tensor");
  if (!momentum_buffers.empty()) {
    if (momentum_buffers.size() != grads.size()) fail(op, "momentum_buffers and grads must have the same length");
    for (size_t i = 0; i < momentum_buffers.size(); ++i)
      if (!momentum_buffers[i] && numels[i]) fail(op, "momentum buffer " + std::to_string(i) + " is a null pointer");
  } else if (momentum != 0.0) {
    fail(op, "momentum != 0 needs momentum buffers");
  }
  SGDHyper h{lr, momentum, dampening, weight_decay, nesterov ? 1 : 0, first_step ? 1 : 0, maximize ? 1 : 0,
             reinterpret_cast<const float*>(lr_ptr), reinterpret_cast<const float*>(grad_scale)};
  size_t first = 0;
  for_each_group(op, params, grads, momentum_buffers, Ptrs(), Ptrs(), numels, param_dtype, grad_dtype, chunk,
                 [&](const MultiTensorArgs& a, int64_t) {
                   check_cuda(sgd_launch(with_shadows(op, a, shadows, shadow_dtype, first),
                                         h, reinterpret_cast<void*>(stream)), op);
                 });
}

// Every tensor (all of one dtype) multiplied in place by the device fp32 scalar at scale.
void multi_tensor_scale(const Ptrs& tensors, const Dims& numels, int dtype, uintptr_t scale, int64_t chunk,
                        uintptr_t stream) {
  const char* op = "multi_tensor_scale";
  check_ptr(op, scale, "scale");
  const float* sp = reinterpret_cast<const float*>(scale);
  for_each_group(op, tensors, tensors, Ptrs(), Ptrs(), Ptrs(), numels, dtype, dtype, chunk,
                 [&](const MultiTensorArgs& a, int64_t) {
                   check_cuda(scale_launch(a, sp, reinterpret_cast<void*>(stream)), op);
                 });
}

// partial: n_partial fp32 slots (at least one per chunk of every gradient); out: 2 fp32 values.
void grad_norm(const Ptrs& grads, const Dims& numels, int grad_dtype, uintptr_t partial, int64_t n_partial,
               uintptr_t out, double max_norm, int64_t chunk, uintptr_t stream) {
  const char* op = "grad_norm";
  check_ptr(op, out, "output");
  check_ptr(op, partial, "partial sums buffer");
  int64_t needed = 0;
  for (int64_t n : numels) needed += chunk > 0 && n > 0 ? (n + chunk - 1) / chunk : 0;
  if (n_partial < needed || n_partial < 1)
    fail(op, "partial sums buffer has " + std::to_string(n_partial) + " slots, needs " + std::to_string(needed));
  float* part = reinterpret_cast<float*>(partial);
  const int64_t used = for_each_group(op, Ptrs(), grads, Ptrs(), Ptrs(), Ptrs(), numels, kF32, grad_dtype, chunk,
                 [&](const MultiTensorArgs& a, int64_t first_block) {
                   check_cuda(sum_squares_launch(a, part + first_block, reinterpret_cast<void*>(stream)), op);
                 });
  check_cuda(norm_finish_launch(part, used, reinterpret_cast<float*>(out), max_norm, reinterpret_cast<void*>(stream)), op);
}


// ---- cross-entropy --------------------------------------------------------

CrossEntropyArgs ce_args(const char* op, uintptr_t logits, int dtype, uintptr_t target, int64_t rows, int64_t classes,
                         int64_t ignore_index, double label_smoothing, uintptr_t lse) {
  if (dtype != kF32 && dtype != kF16 && dtype != kBF16)
    fail(op, "logits must be float32, float16 or bfloat16 (dtype code " + std::to_string(dtype) + ")");
  if (rows < 0 || classes < 1) fail(op, "needs rows >= 0 and classes >= 1, got " + std::to_string(rows) + ", " + std::to_string(classes));
  if (!(label_smoothing >= 0.0 && label_smoothing <= 1.0))
    fail(op, "label_smoothing must be in [0, 1], got " + std::to_string(label_smoothing));
  if (rows) {
    check_ptr(op, logits, "logits");
    check_ptr(op, target, "target");
    check_ptr(op, lse, "lse");
    if (target % 8) fail(op, "target must be an aligned int64 tensor");
  }
  CrossEntropyArgs a{};
  a.logits = reinterpret_cast<const void*>(logits);
  a.dtype = dtype;
  a.target = reinterpret_cast<const int64_t*>(target);
  a.rows = rows;
  a.classes = classes;
  a.ignore_index = ignore_index;
  a.label_smoothing = label_smoothing;
  a.lse = reinterpret_cast<float*>(lse);
  return a;
}

void cross_entropy(uintptr_t logits, int dtype, uintptr_t target, int64_t rows, int64_t classes, int64_t ignore_index,
                   double label_smoothing, uintptr_t loss, uintptr_t lse, uintptr_t stream, uintptr_t error) {
  const char* op = "cross_entropy";
  CrossEntropyArgs a = ce_args(op, logits, dtype, target, rows, classes, ignore_index, label_smoothing, lse);
  if (!rows) return;
  check_ptr(op, loss, "loss");
  a.loss = reinterpret_cast<float*>(loss);
  a.error = reinterpret_cast<IndexErrorRecord*>(error);
  check_cuda(cross_entropy_forward_launch(a, reinterpret_cast<void*>(stream)), op);
}

void cross_entropy_backward(uintptr_t logits, int dtype, uintptr_t target, int64_t rows, int64_t classes,
                            int64_t ignore_index, double label_smoothing, uintptr_t lse, uintptr_t grad_rows,
                            uintptr_t grad_logits, uintptr_t stream) {
  const char* op = "cross_entropy_backward";
  CrossEntropyArgs a = ce_args(op, logits, dtype, target, rows, classes, ignore_index, label_smoothing, lse);
  if (!rows) return;
  check_ptr(op, grad_rows, "grad_rows");
  check_ptr(op, grad_logits, "grad_logits");
  a.grad_rows = reinterpret_cast<const float*>(grad_rows);
  a.grad_logits = reinterpret_cast<void*>(grad_logits);
  check_cuda(cross_entropy_backward_launch(a, reinterpret_cast<void*>(stream)), op);
}


// ---- scan and sort ----------------------------------------------------------

void cumsum(uintptr_t x, int x_dtype, uintptr_t out, int out_dtype, int compute, int64_t outer, int64_t n,
            int64_t inner, uintptr_t stream) {
  const char* op = "cumsum";
  check_dtype(op, x_dtype, "input");
  check_dtype(op, out_dtype, "output");
  check_compute(op, compute);
  if (outer < 0 || n < 0 || inner < 0) fail(op, "negative extent");
  if (outer * n * inner == 0) return;
  check_ptr(op, x, "input");
  check_ptr(op, out, "output");
  ScanArgs a{reinterpret_cast<const void*>(x), x_dtype, reinterpret_cast<void*>(out), out_dtype, compute, outer, n, inner};
  check_cuda(cumsum_launch(a, reinterpret_cast<void*>(stream)), op);
}

void sort(uintptr_t x, int dtype, uintptr_t values, uintptr_t indices, int64_t outer, int64_t n, int64_t inner,
          int64_t count, bool descending, uintptr_t stream) {
  const char* op = "sort";
  check_dtype(op, dtype, "input");
  if (outer < 0 || n < 0 || inner < 0) fail(op, "negative extent");
  if (count < 0 || count > n) fail(op, "count " + std::to_string(count) + " outside [0, " + std::to_string(n) + "]");
  if (outer * count * inner == 0) return;
  check_ptr(op, x, "input");
  check_ptr(op, values, "values");
  check_ptr(op, indices, "indices");
  SortArgs a{reinterpret_cast<const void*>(x), dtype, reinterpret_cast<void*>(values),
             reinterpret_cast<int64_t*>(indices), outer, n, inner, count, descending ? 1 : 0};
  check_cuda(sort_launch(a, reinterpret_cast<void*>(stream)), op);
}

}  // namespace
}  // namespace ops
}  // namespace cutegrad

namespace cutegrad {
namespace {
void register_ops(nb::module_& m) {
  using namespace cutegrad::ops;
  m.def("elementwise", &elementwise, nb::arg("family"), nb::arg("code"), nb::arg("compute"), nb::arg("shape"),
        nb::arg("out"), nb::arg("out_dtype"), nb::arg("out_strides"), nb::arg("x"), nb::arg("x_dtype"),
        nb::arg("x_strides"), nb::arg("x_scalar").none(), nb::arg("y"), nb::arg("y_dtype"), nb::arg("y_strides"),
        nb::arg("y_scalar").none(), nb::arg("z"), nb::arg("z_dtype"), nb::arg("z_strides"), nb::arg("z_scalar").none(),
        nb::arg("lo").none(), nb::arg("hi").none(), nb::arg("stream"),
        "out = f(x, y, z) elementwise with broadcasting strides (family, code, compute, shape, out, out_dtype, "
        "out_strides, then ptr, dtype, strides, scalar for each input, lo, hi, stream).");
  m.def("reduce", &reduce, "Reduce input over `dims` into a contiguous output (code, compute, ...).");
  m.def("softmax", &softmax,
        "softmax/log_softmax of a contiguous (outer, n, inner) tensor along n; causal_rows = L > 0 masks "
        "columns j > (row mod L) of the last dim.");
  m.def("softmax_backward", &softmax_backward,
        "softmax/log_softmax backward from the saved output y and dy, contiguous (outer, n, inner), along n.");
  m.def("norm", &norm, "layer_norm / rms_norm forward of contiguous (rows, n) with per-row statistics.");
  m.def("norm_backward", &norm_backward, "layer_norm / rms_norm backward (dx, dweight, dbias) from saved statistics.");
  m.def("gather", &gather, nb::arg("shape"), nb::arg("dim"), nb::arg("dim_size"), nb::arg("index"),
        nb::arg("index_dtype"), nb::arg("index_strides"), nb::arg("src"), nb::arg("src_dtype"), nb::arg("src_strides"),
        nb::arg("dst"), nb::arg("dst_dtype"), nb::arg("dst_strides"), nb::arg("stream"), nb::arg("error") = 0,
        nb::arg("error_op") = 0, nb::arg("error_dim") = 0,
        "dst[p] = src[p with coordinate dim := index[p]]; bad indices are skipped and recorded at `error`.");
  m.def("scatter", &scatter, nb::arg("shape"), nb::arg("dim"), nb::arg("dim_size"), nb::arg("index"),
        nb::arg("index_dtype"), nb::arg("index_strides"), nb::arg("src"), nb::arg("src_dtype"), nb::arg("src_strides"),
        nb::arg("scalar").none(), nb::arg("dst"), nb::arg("dst_dtype"), nb::arg("dst_strides"), nb::arg("accumulate"),
        nb::arg("stream"), nb::arg("error") = 0, nb::arg("error_op") = 0, nb::arg("error_dim") = 0,
        "dst[p with coordinate dim := index[p]] (+)= src[p] or a scalar; bad indices are skipped and recorded.");
  m.def("cross_entropy", &cross_entropy, nb::arg("logits"), nb::arg("dtype"), nb::arg("target"), nb::arg("rows"),
        nb::arg("classes"), nb::arg("ignore_index"), nb::arg("label_smoothing"), nb::arg("loss"), nb::arg("lse"),
        nb::arg("stream"), nb::arg("error") = 0,
        "Per-row cross-entropy loss and logsumexp of contiguous logits; bad targets are recorded at `error`.");
  m.def("cross_entropy_backward", &cross_entropy_backward, "Gradient of the per-row cross-entropy w.r.t. the logits.");
  m.def("cumsum", &cumsum, "Inclusive prefix sum along n of a contiguous (outer, n, inner) tensor.");
  m.def("sort", &sort, "Stable sort / top-count along n of a contiguous (outer, n, inner) tensor (values, indices).");
  m.def("adamw", &adamw, "Fused multi-tensor Adam/AdamW step (pointer lists; see docs/cuda_ops.md).");
  m.def("sgd", &sgd, "Fused multi-tensor SGD step (momentum, dampening, Nesterov, weight decay).");
  m.def("grad_norm", &grad_norm, "Global L2 norm of gradients and the clipping coefficient, on the device.");
  m.def("multi_tensor_scale", &multi_tensor_scale, "Scale every tensor of a list in place by a device fp32 scalar.");
  m.def("index_add_rows", &index_add_rows, nb::arg("dst"), nb::arg("dtype"), nb::arg("src"), nb::arg("index"),
        nb::arg("n"), nb::arg("rows"), nb::arg("cols"), nb::arg("perm"), nb::arg("sorted"), nb::arg("stream"),
        nb::arg("error") = 0, nb::arg("error_op") = 0,
        "Deterministic dst[index[i], :] += src[i, :] (stable rank + run sums); bad rows are recorded.");
  m.def("random", &random_tensor, "Philox random tensor (uniform, normal, randint, scaled Bernoulli mask).");
}


// The CUDA C++ kernels are plain nvcc objects: nothing to load before a capture.
Bindings g_ops_bindings(&register_ops, nullptr);
}  // namespace
}  // namespace cutegrad
