// Elementwise kernels: unary, binary, where, clamp, activation backward,
// cast/strided copy/fill, arange.
//
// Design (TensorIterator-style): the bindings broadcast every operand to the
// output shape (stride 0 on broadcast dimensions), drop extent-1 dimensions
// and merge dimensions that are contiguous for every operand, so most calls
// arrive with 1-3 dimensions.  Two kernels then cover every case:
//  * vectorized: every tensor operand is contiguous, of the output's dtype
//    (fp32, fp16 or bf16) and 16-byte aligned.  Each thread moves 16 bytes
//    per operand with one vector load/store; the ragged tail (< one vector)
//    is done element by element by the first threads.  Also 2-d launches
//    whose rows are a multiple of 16 bytes where an operand repeats one row
//    (a bias add): that operand's pack index is taken modulo the row.
//  * strided: any strides, any dtype per operand.  A linear index is split
//    into coordinates (32-bit division when the extent allows) and dotted
//    with each operand's strides; loads and stores go through a runtime dtype
//    switch into the compute type.  Each thread loads 4 elements (a block
//    stride apart, so warps stay coalesced) before computing and storing.
// The op is chosen by a (family, code) switch inside the loop; it is uniform
// over the launch, so it is a predictable branch, not divergence.
//
// Copies of a tensor (family copy with a tensor source: contiguous(),
// reshape of permuted views, casts, copy_) that the vectorized kernel cannot
// take have kernels of their own, chosen on the coalesced dimensions:
//  * transpose: the destination's unit-stride dimension p differs from the
//    source's unit-stride dimension q (a transpose-like permute) and both
//    extents are >= 8.  A 256-thread block moves 32x32 tiles of the (q, p)
//    plane through shared memory (rows padded to 33 words against bank
//    conflicts): lanes read along q and write along p, so both sides are
//    coalesced.  The remaining dimensions and the tile coordinates come from
//    one linear tile index per block (grid-stride over tiles, so no grid-y/z
//    limit applies).
//  * packed: everything else.  With one dtype on both sides the element bits
//    are moved as raw words; when the innermost dimension is unit-stride on
//    both sides, pointers, the inner extent and every other stride allow it,
//    W-byte packs (W up to 16) replace elements, so a permute that keeps the
//    innermost dimension moves 16 bytes per load.  Casts move elements
//    through the compute type.  Each thread issues 4 independent loads
//    before its stores, to keep enough bytes in flight per SM.
// Both use 32-bit index and offset arithmetic when the element count and the
// offset span of both sides fit in int32.
//
// AOT specializations: strided kernel for compute fp32 / fp64 / int64, each
// with 32- and 64-bit indexing; vectorized kernel for fp32, fp16 and bf16;
// packed copy for raw 1/2/4/8/16-byte words and casts through fp32 / fp64 /
// int64, transpose for raw 1/2/4/8-byte words and the same casts, each with
// 32- and 64-bit indexing.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "dtype_access.h"
#include "ops_args.h"

namespace cutegrad {
namespace ops {
namespace {

// cutegrad.ops.codes, through the header the build generates from it (op_codes.h)
using namespace codes;

constexpr int kThreads = 256;

template <typename C> __device__ __forceinline__ C nan_max(C a, C b) {
  if (m_isnan(a)) return a;
  if (m_isnan(b)) return b;
  return a > b ? a : b;
}
template <typename C> __device__ __forceinline__ C nan_min(C a, C b) {
  if (m_isnan(a)) return a;
  if (m_isnan(b)) return b;
  return a < b ? a : b;
}

template <typename C> __device__ __forceinline__ C sigmoid(C x) {
  C e = m_exp(-m_fabs(x));
  return x >= C(0) ? C(1) / (C(1) + e) : e / (C(1) + e);
}

template <typename C> __device__ C unary_float(int code, C x) {
  switch (code) {
    case NEG: return -x;
    case EXP: return m_exp(x);
    case LOG: return m_log(x);
    case SQRT: return m_sqrt(x);
    case RSQRT: return C(1) / m_sqrt(x);
    case ABS: return m_fabs(x);
    case TANH: return m_tanh(x);
    case SIGMOID: return sigmoid(x);
    case RELU: return m_isnan(x) ? x : (x > C(0) ? x : C(0));
    case GELU: return C(0.5) * x * (C(1) + m_erf(x * C(0.70710678118654752440)));
    case GELU_TANH: {
      const C k = C(0.79788456080286535588);
      return C(0.5) * x * (C(1) + m_tanh(k * (x + C(0.044715) * x * x * x)));
    }
    case SILU: return x * sigmoid(x);
    case SIGN: return x > C(0) ? C(1) : (x < C(0) ? C(-1) : x);  // keeps 0, -0 and NaN
    case SIN: return m_sin(x);
    case COS: return m_cos(x);
    case LOGICAL_NOT: return x == C(0) ? C(1) : C(0);
    case RECIPROCAL: return C(1) / x;
    case SQUARE: return x * x;
    case ERF: return m_erf(x);
    case LOG1P: return m_log1p(x);
    case EXPM1: return m_expm1(x);
    case FLOOR: return m_floor(x);
    case CEIL: return m_ceil(x);
    case ROUND: return m_rint(x);  // half to even, as NumPy
    case TRUNC: return m_trunc(x);
    case ISNAN: return m_isnan(x) ? C(1) : C(0);
    case ISINF: return (m_fabs(x) == m_inf<C>()) ? C(1) : C(0);
    default: return (!m_isnan(x) && m_fabs(x) != m_inf<C>()) ? C(1) : C(0);  // ISFINITE
  }
}

__device__ int64_t unary_int(int code, int64_t x) {
  switch (code) {
    case NEG: return -x;
    case ABS: return x < 0 ? -x : x;
    case RELU: return x > 0 ? x : 0;
    case SIGN: return (x > 0) - (x < 0);
    case LOGICAL_NOT: return x == 0;
    case SQUARE: return x * x;
    case ISNAN: case ISINF: return 0;
    case ISFINITE: return 1;
    default: return x;  // FLOOR, CEIL, ROUND, TRUNC of an integer
  }
}

// NumPy's floor_divide / remainder on floats (npy_divmod): exact where floor(a / b) is not.
template <typename C> __device__ C py_floordiv(C a, C b) {
  if (b == C(0)) return a / b;
  C mod = m_fmod(a, b);
  C div = (a - mod) / b;
  if (mod != C(0) && ((b < C(0)) != (mod < C(0)))) div -= C(1);
  if (div != C(0)) {
    C fl = m_floor(div);
    if (div - fl > C(0.5)) fl += C(1);
    return fl;
  }
  return m_copysign(C(0), a / b);
}
template <typename C> __device__ C py_remainder(C a, C b) {
  C mod = m_fmod(a, b);
  if (b == C(0)) return mod;
  if (mod != C(0)) {
    if ((b < C(0)) != (mod < C(0))) mod += b;
  } else {
    mod = m_copysign(C(0), b);
  }
  return mod;
}

template <typename C> __device__ C binary_float(int code, C a, C b) {
  switch (code) {
    case ADD: return a + b;
    case SUB: return a - b;
    case MUL: return a * b;
    case DIV: return a / b;
    case POW: return m_pow(a, b);
    case MAXIMUM: return nan_max(a, b);
    case MINIMUM: return nan_min(a, b);
    case EQ: return a == b;
    case NE: return a != b;
    case LT: return a < b;
    case LE: return a <= b;
    case GT: return a > b;
    case GE: return a >= b;
    case AND: return (a != C(0)) && (b != C(0));
    case OR: return (a != C(0)) || (b != C(0));
    case XOR: return (a != C(0)) != (b != C(0));
    case FLOORDIV: return py_floordiv(a, b);
    case REMAINDER: return py_remainder(a, b);
    default: return m_atan2(a, b);
  }
}

__device__ int64_t int_pow(int64_t base, int64_t e) {
  if (e < 0) return (base == 1) ? 1 : (base == -1 ? ((e & 1) ? -1 : 1) : 0);
  int64_t r = 1;
  while (e) {
    if (e & 1) r *= base;
    base *= base;
    e >>= 1;
  }
  return r;
}

// Integer division by zero gives 0, as NumPy does (with a warning), instead of a trap value.
__device__ int64_t binary_int(int code, int64_t a, int64_t b) {
  switch (code) {
    case ADD: return a + b;
    case SUB: return a - b;
    case MUL: return a * b;
    case DIV: return b == 0 ? 0 : a / b;
    case POW: return int_pow(a, b);
    case MAXIMUM: return a > b ? a : b;
    case MINIMUM: return a < b ? a : b;
    case EQ: return a == b;
    case NE: return a != b;
    case LT: return a < b;
    case LE: return a <= b;
    case GT: return a > b;
    case GE: return a >= b;
    case AND: return (a != 0) && (b != 0);
    case OR: return (a != 0) || (b != 0);
    case XOR: return (a != 0) != (b != 0);
    case FLOORDIV: {
      if (b == 0) return 0;
      int64_t q = a / b;
      return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
    }
    case REMAINDER: {
      if (b == 0) return 0;
      int64_t r = a % b;
      return (r != 0 && ((r < 0) != (b < 0))) ? r + b : r;
    }
    default: return static_cast<int64_t>(::atan2(static_cast<double>(a), static_cast<double>(b)));
  }
}

template <typename C> __device__ C act_backward(int code, C g, C x) {
  if (code == GELU) {
    C cdf = C(0.5) * (C(1) + m_erf(x * C(0.70710678118654752440)));
    C pdf = m_exp(C(-0.5) * x * x) * C(0.39894228040143267794);
    return g * (cdf + x * pdf);
  }
  if (code == GELU_TANH) {
    const C k = C(0.79788456080286535588);
    C th = m_tanh(k * (x + C(0.044715) * x * x * x));
    return g * (C(0.5) * (C(1) + th) + C(0.5) * x * (C(1) - th * th) * k * (C(1) + C(3 * 0.044715) * x * x));
  }
  C s = sigmoid(x);  // SILU
  return g * (s * (C(1) + x * (C(1) - s)));
}

template <typename C> __device__ __forceinline__ C apply(const ElementwiseArgs& a, C x, C y, C z) {
  switch (a.family) {
    case kUnary:
      if constexpr (std::is_floating_point<C>::value) return unary_float(a.code, x); else return unary_int(a.code, x);
    case kBinary:
      if constexpr (std::is_floating_point<C>::value) return binary_float(a.code, x, y); else return binary_int(a.code, x, y);
    case kWhere: return x != C(0) ? y : z;
    case kClamp: {
      C r = x;
      if constexpr (std::is_floating_point<C>::value) {
        if (a.has_lo) r = nan_max(r, static_cast<C>(a.p0));
        if (a.has_hi) r = nan_min(r, static_cast<C>(a.p1));
      } else {
        if (a.has_lo && r < a.i0) r = a.i0;
        if (a.has_hi && r > a.i1) r = a.i1;
      }
      return r;
    }
    case kActBackward:
      if constexpr (std::is_floating_point<C>::value) return act_backward(a.code, x, y); else return x;
    default: return x;  // kCopy
  }
}

template <typename C> __device__ __forceinline__ C scalar_of(const Operand& op) {
  if constexpr (std::is_floating_point<C>::value) return static_cast<C>(op.scalar_f);
  else return static_cast<C>(op.scalar_i);
}

// Elements per thread per iteration of the strided kernel: all loads are
// issued before the first store, so each thread has several independent
// memory requests in flight (one 2-4 byte element per thread leaves HBM
// latency-bound).
constexpr int kStridedUnroll = 4;

template <typename C, typename I>
__global__ void __launch_bounds__(kThreads) strided_kernel(const ElementwiseArgs a) {
  const I n = static_cast<I>(a.numel);
  const I chunk = static_cast<I>(kThreads) * kStridedUnroll;
  for (I first = static_cast<I>(blockIdx.x) * chunk + threadIdx.x; first < n;
       first += static_cast<I>(gridDim.x) * chunk) {
    if (a.family == kArange) {
#pragma unroll
      for (int u = 0; u < kStridedUnroll; ++u) {
        const I i = first + static_cast<I>(u) * kThreads;
        if (i >= n) break;
        if constexpr (std::is_floating_point<C>::value) {
          store_from<double>(a.out, a.out_dtype, i * a.out_strides[0], a.p0 + static_cast<double>(i) * a.p1);
        } else {
          store_from<int64_t>(a.out, a.out_dtype, i * a.out_strides[0], a.i0 + static_cast<int64_t>(i) * a.i1);
        }
      }
      continue;
    }
    C x[kStridedUnroll], y[kStridedUnroll], z[kStridedUnroll];
    int64_t off_out[kStridedUnroll];
#pragma unroll
    for (int u = 0; u < kStridedUnroll; ++u) {
      const I i = first + static_cast<I>(u) * kThreads;
      if (i >= n) break;
      int64_t off_o = 0, off0 = 0, off1 = 0, off2 = 0;
      I rem = i;
      for (int d = a.ndim - 1; d >= 0; --d) {
        const I size = static_cast<I>(a.sizes[d]);
        const I c = rem % size;
        rem /= size;
        off_o += static_cast<int64_t>(c) * a.out_strides[d];
        off0 += static_cast<int64_t>(c) * a.in[0].strides[d];
        off1 += static_cast<int64_t>(c) * a.in[1].strides[d];
        off2 += static_cast<int64_t>(c) * a.in[2].strides[d];
      }
      off_out[u] = off_o;
      x[u] = a.in[0].is_scalar ? scalar_of<C>(a.in[0]) : load_as<C>(a.in[0].data, a.in[0].dtype, off0);
      y[u] = C(0);
      z[u] = C(0);
      if (a.nin > 1) y[u] = a.in[1].is_scalar ? scalar_of<C>(a.in[1]) : load_as<C>(a.in[1].data, a.in[1].dtype, off1);
      if (a.nin > 2) z[u] = a.in[2].is_scalar ? scalar_of<C>(a.in[2]) : load_as<C>(a.in[2].data, a.in[2].dtype, off2);
    }
#pragma unroll
    for (int u = 0; u < kStridedUnroll; ++u) {
      if (first + static_cast<I>(u) * kThreads >= n) break;
      store_from<C>(a.out, a.out_dtype, off_out[u], apply<C>(a, x[u], y[u], z[u]));
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) vectorized_kernel(const ElementwiseArgs a) {
  constexpr int kVec = 16 / sizeof(T);
  struct alignas(16) Pack { T v[kVec]; };
  const int64_t n = a.numel;
  const int64_t n_vec = n / kVec;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  float s[3];
  bool row_bcast[3];
  // 2-d launches: operands with row stride 0 (a bias) repeat one row of row_len elements.
  const int64_t row_len = a.ndim == 2 ? a.sizes[1] : n;
  const int64_t row_packs = row_len / kVec;
  const bool narrow_mod = n_vec < (int64_t(1) << 32);
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    s[k] = static_cast<float>(a.in[k].scalar_f);
    row_bcast[k] = a.ndim == 2 && a.in[k].strides[0] == 0;
  }
  for (int64_t v = first; v < n_vec; v += stride) {
    Pack in[3], out;
    const int64_t col = a.ndim != 2 ? v
                        : (narrow_mod ? static_cast<int64_t>(static_cast<uint32_t>(v) % static_cast<uint32_t>(row_packs))
                                      : v % row_packs);
    // Fully unrolled so in[] is indexed by constants and stays in registers.
#pragma unroll
    for (int k = 0; k < 3; ++k)
      if (k < a.nin && !a.in[k].is_scalar) in[k] = static_cast<const Pack*>(a.in[k].data)[row_bcast[k] ? col : v];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      float x = a.in[0].is_scalar ? s[0] : widen(in[0].v[j]);
      float y = a.nin > 1 ? (a.in[1].is_scalar ? s[1] : widen(in[1].v[j])) : 0.f;
      float z = a.nin > 2 ? (a.in[2].is_scalar ? s[2] : widen(in[2].v[j])) : 0.f;
      out.v[j] = narrow<T>(apply<float>(a, x, y, z));
    }
    static_cast<Pack*>(a.out)[v] = out;
  }
  // Only 1-d launches have a tail: 2-d ones have row_len % kVec == 0.
  const int64_t tail = n_vec * kVec + first;
  if (tail < n) {
    float x = a.in[0].is_scalar ? s[0] : widen(static_cast<const T*>(a.in[0].data)[tail]);
    float y = a.nin > 1 ? (a.in[1].is_scalar ? s[1] : widen(static_cast<const T*>(a.in[1].data)[tail])) : 0.f;
    float z = a.nin > 2 ? (a.in[2].is_scalar ? s[2] : widen(static_cast<const T*>(a.in[2].data)[tail])) : 0.f;
    static_cast<T*>(a.out)[tail] = narrow<T>(apply<float>(a, x, y, z));
  }
}

bool vectorizable(const ElementwiseArgs& a) {
  if (a.family == kArange || a.compute != kComputeF32) return false;
  if (a.out_dtype != kF32 && a.out_dtype != kF16 && a.out_dtype != kBF16) return false;
  // 1-d contiguous, or 2-d rows (contiguous output, rows a multiple of 16
  // bytes) where some operands broadcast one row along the other dimension.
  if (a.ndim < 1 || a.ndim > 2) return false;
  const int last = a.ndim - 1;
  const int64_t vec = a.out_dtype == kF32 ? 4 : 8;
  if (a.out_strides[last] != 1 || reinterpret_cast<uintptr_t>(a.out) % 16) return false;
  if (a.ndim == 2 && (a.out_strides[0] != a.sizes[1] || a.sizes[1] % vec != 0)) return false;
  for (int k = 0; k < a.nin; ++k) {
    const Operand& op = a.in[k];
    if (op.is_scalar) continue;
    if (op.dtype != a.out_dtype || op.strides[last] != 1 || reinterpret_cast<uintptr_t>(op.data) % 16) return false;
    if (a.ndim == 2 && op.strides[0] != a.sizes[1] && op.strides[0] != 0) return false;
  }
  return true;
}

unsigned grid_for(int64_t work) {
  int64_t blocks = (work + kThreads - 1) / kThreads;
  if (blocks < 1) blocks = 1;
  const int64_t cap = int64_t(1) << 20;  // grid-stride loops cover the rest
  return static_cast<unsigned>(blocks < cap ? blocks : cap);
}

template <typename C>
void launch_strided(const ElementwiseArgs& a, cudaStream_t s) {
  const unsigned grid = grid_for((a.numel + kStridedUnroll - 1) / kStridedUnroll);
  if (a.numel < (int64_t(1) << 31)) strided_kernel<C, uint32_t><<<grid, kThreads, 0, s>>>(a);
  else strided_kernel<C, uint64_t><<<grid, kThreads, 0, s>>>(a);
}

// ---- copies ----------------------------------------------------------------

struct CopyArgs {
  const void* in;
  void* out;
  int in_dtype, out_dtype;
  int ndim;
  int p, q;  // transpose: destination's and source's unit-stride dimensions
  int64_t numel;  // packed: number of packs; transpose: number of tiles
  int64_t tiles_p, tiles_q;
  int64_t sizes[kMaxDims];
  int64_t in_strides[kMaxDims];
  int64_t out_strides[kMaxDims];
};

// Raw word moves for copies within one dtype (bit-exact, no conversion).
template <typename T> struct RawMove {
  using Value = T;
  // Sub-word values are widened in shared memory so transposed reads hit distinct banks.
  using Shared = typename std::conditional<(sizeof(T) < 4), uint32_t, T>::type;
  __device__ __forceinline__ static T load(const void* p, int, int64_t off) { return static_cast<const T*>(p)[off]; }
  __device__ __forceinline__ static void store(void* p, int, int64_t off, T v) { static_cast<T*>(p)[off] = v; }
};

// Casts: load any dtype into the compute type, round once on store.
template <typename C> struct CastMove {
  using Value = C;
  using Shared = C;
  __device__ __forceinline__ static C load(const void* p, int dtype, int64_t off) { return load_as<C>(p, dtype, off); }
  __device__ __forceinline__ static void store(void* p, int dtype, int64_t off, C v) { store_from<C>(p, dtype, off, v); }
};

// kNarrow: unsigned 32-bit coordinates and signed 32-bit offsets.
template <bool kNarrow> struct IndexTypes {
  using I = uint32_t;
  using O = int32_t;
};
template <> struct IndexTypes<false> {
  using I = uint64_t;
  using O = int64_t;
};

// Each thread keeps kCopyUnroll independent loads in flight before storing:
// one 4-byte element per thread is far too little traffic per SM to cover
// HBM latency (casts and sub-16-byte words need it most).
constexpr int kCopyUnroll = 4;

template <typename Move, bool kNarrow>
__global__ void __launch_bounds__(kThreads) packed_copy_kernel(const CopyArgs a) {
  using I = typename IndexTypes<kNarrow>::I;
  using O = typename IndexTypes<kNarrow>::O;
  using V = typename Move::Value;
  const I n = static_cast<I>(a.numel);
  const I chunk = static_cast<I>(kThreads) * kCopyUnroll;
  for (I first = static_cast<I>(blockIdx.x) * chunk + threadIdx.x; first < n;
       first += static_cast<I>(gridDim.x) * chunk) {
    V v[kCopyUnroll];
    O off_out[kCopyUnroll];
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) {
      const I i = first + static_cast<I>(u) * kThreads;
      if (i >= n) break;
      I rem = i;
      O off_in = 0, off_o = 0;
      for (int d = a.ndim - 1; d >= 0; --d) {
        const I size = static_cast<I>(a.sizes[d]);
        const O c = static_cast<O>(rem % size);
        rem /= size;
        off_in += c * static_cast<O>(a.in_strides[d]);
        off_o += c * static_cast<O>(a.out_strides[d]);
      }
      off_out[u] = off_o;
      v[u] = Move::load(a.in, a.in_dtype, off_in);
    }
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) {
      if (first + static_cast<I>(u) * kThreads >= n) break;
      Move::store(a.out, a.out_dtype, off_out[u], v[u]);
    }
  }
}

constexpr int kTile = 32;
constexpr int kTileRows = kThreads / kTile;

template <typename Move, bool kNarrow>
__global__ void __launch_bounds__(kThreads) transpose_copy_kernel(const CopyArgs a) {
  using I = typename IndexTypes<kNarrow>::I;
  using O = typename IndexTypes<kNarrow>::O;
  using S = typename Move::Shared;
  __shared__ S tile[kTile][kTile + 1];
  const int lane = threadIdx.x % kTile, row = threadIdx.x / kTile;
  const I ext_p = static_cast<I>(a.sizes[a.p]), ext_q = static_cast<I>(a.sizes[a.q]);
  const O in_p = static_cast<O>(a.in_strides[a.p]), in_q = static_cast<O>(a.in_strides[a.q]);
  const O out_p = static_cast<O>(a.out_strides[a.p]), out_q = static_cast<O>(a.out_strides[a.q]);
  const I tiles_q = static_cast<I>(a.tiles_q), tiles_p = static_cast<I>(a.tiles_p);
  const I n_tiles = static_cast<I>(a.numel);
  for (I t = blockIdx.x; t < n_tiles; t += gridDim.x) {
    I rem = t;
    const I q0 = (rem % tiles_q) * kTile;
    rem /= tiles_q;
    const I p0 = (rem % tiles_p) * kTile;
    rem /= tiles_p;
    O base_in = 0, base_out = 0;
    for (int d = a.ndim - 1; d >= 0; --d) {
      if (d == a.p || d == a.q) continue;
      const I size = static_cast<I>(a.sizes[d]);
      const O c = static_cast<O>(rem % size);
      rem /= size;
      base_in += c * static_cast<O>(a.in_strides[d]);
      base_out += c * static_cast<O>(a.out_strides[d]);
    }
    // Read: lanes walk the source's unit-stride dimension q.
    const I iq_read = q0 + lane;
#pragma unroll
    for (int r = 0; r < kTile / kTileRows; ++r) {
      const int j = row + r * kTileRows;
      const I ip = p0 + j;
      if (ip < ext_p && iq_read < ext_q)
        tile[j][lane] = static_cast<S>(Move::load(a.in, a.in_dtype, base_in + static_cast<O>(iq_read) * in_q +
                                                                        static_cast<O>(ip) * in_p));
    }
    __syncthreads();
    // Write: lanes walk the destination's unit-stride dimension p.
    const I ip_write = p0 + lane;
#pragma unroll
    for (int r = 0; r < kTile / kTileRows; ++r) {
      const int j = row + r * kTileRows;
      const I iq = q0 + j;
      if (ip_write < ext_p && iq < ext_q)
        Move::store(a.out, a.out_dtype, base_out + static_cast<O>(iq) * out_q + static_cast<O>(ip_write) * out_p,
                    static_cast<typename Move::Value>(tile[lane][j]));
    }
    __syncthreads();
  }
}

int dtype_size(int dtype) {
  switch (dtype) {
    case kBool: case kU8: case kI8: return 1;
    case kI16: case kF16: case kBF16: return 2;
    case kI32: case kF32: return 4;
    default: return 8;
  }
}

// Largest |offset| either side can reach, in elements; decides 32-bit offsets.
int64_t offset_span(const CopyArgs& c, const int64_t* strides) {
  int64_t span = 0;
  for (int d = 0; d < c.ndim; ++d) span += (c.sizes[d] - 1) * (strides[d] < 0 ? -strides[d] : strides[d]);
  return span;
}

bool fits_narrow(const CopyArgs& c) {
  const int64_t lim = (int64_t(1) << 31) - 1;
  return c.numel < lim && offset_span(c, c.in_strides) < lim && offset_span(c, c.out_strides) < lim;
}

enum CopyKernel { kPacked, kTransposed };

template <CopyKernel K, typename Move>
void launch_copy(const CopyArgs& c, unsigned grid, cudaStream_t s) {
  const bool narrow = fits_narrow(c);
  if constexpr (K == kPacked) {
    if (narrow) packed_copy_kernel<Move, true><<<grid, kThreads, 0, s>>>(c);
    else packed_copy_kernel<Move, false><<<grid, kThreads, 0, s>>>(c);
  } else {
    if (narrow) transpose_copy_kernel<Move, true><<<grid, kThreads, 0, s>>>(c);
    else transpose_copy_kernel<Move, false><<<grid, kThreads, 0, s>>>(c);
  }
}

template <CopyKernel K>
void launch_cast(const CopyArgs& c, int compute, unsigned grid, cudaStream_t s) {
  if (compute == kComputeF32) launch_copy<K, CastMove<float>>(c, grid, s);
  else if (compute == kComputeF64) launch_copy<K, CastMove<double>>(c, grid, s);
  else launch_copy<K, CastMove<int64_t>>(c, grid, s);
}

void copy_launch(const ElementwiseArgs& a, cudaStream_t s) {
  CopyArgs c{};
  c.in = a.in[0].data;
  c.out = a.out;
  c.in_dtype = a.in[0].dtype;
  c.out_dtype = a.out_dtype;
  c.ndim = a.ndim;
  for (int d = 0; d < a.ndim; ++d) {
    c.sizes[d] = a.sizes[d];
    c.in_strides[d] = a.in[0].strides[d];
    c.out_strides[d] = a.out_strides[d];
  }
  const bool same = c.in_dtype == c.out_dtype;
  const int es = dtype_size(c.out_dtype);

  // Transpose-like: unit strides on different dimensions of the two sides.
  int p = -1, q = -1;
  for (int d = 0; d < c.ndim; ++d) {
    if (c.out_strides[d] == 1) p = d;
    if (c.in_strides[d] == 1) q = d;
  }
  if (p >= 0 && q >= 0 && p != q && c.in_strides[p] != 1 && c.sizes[p] >= 8 && c.sizes[q] >= 8) {
    c.p = p;
    c.q = q;
    c.tiles_p = (c.sizes[p] + kTile - 1) / kTile;
    c.tiles_q = (c.sizes[q] + kTile - 1) / kTile;
    c.numel = c.tiles_p * c.tiles_q * (a.numel / (c.sizes[p] * c.sizes[q]));
    const int64_t cap = int64_t(1) << 20;
    const unsigned grid = static_cast<unsigned>(c.numel < cap ? c.numel : cap);
    if (!same) launch_cast<kTransposed>(c, a.compute, grid, s);
    else if (es == 1) launch_copy<kTransposed, RawMove<uint8_t>>(c, grid, s);
    else if (es == 2) launch_copy<kTransposed, RawMove<uint16_t>>(c, grid, s);
    else if (es == 4) launch_copy<kTransposed, RawMove<uint32_t>>(c, grid, s);
    else launch_copy<kTransposed, RawMove<uint64_t>>(c, grid, s);
    return;
  }

  c.numel = a.numel;
  if (!same) {
    launch_cast<kPacked>(c, a.compute, grid_for((c.numel + kCopyUnroll - 1) / kCopyUnroll), s);
    return;
  }
  // Widest pack W (bytes) that every pointer, stride and the inner extent allow.
  int w = es;
  const int last = c.ndim - 1;  // -1: a single element, every extent was 1
  if (last >= 0 && c.in_strides[last] == 1 && c.out_strides[last] == 1) {
    for (int cand = 16; cand > es; cand /= 2) {
      const int64_t per = cand / es;  // elements per pack
      bool ok = reinterpret_cast<uintptr_t>(c.in) % cand == 0 && reinterpret_cast<uintptr_t>(c.out) % cand == 0 &&
                c.sizes[last] % per == 0;
      for (int d = 0; ok && d < last; ++d) ok = c.in_strides[d] % per == 0 && c.out_strides[d] % per == 0;
      if (ok) {
        w = cand;
        break;
      }
    }
  }
  if (w > es) {
    const int64_t per = w / es;
    c.sizes[last] /= per;
    for (int d = 0; d < last; ++d) {
      c.in_strides[d] /= per;
      c.out_strides[d] /= per;
    }
    c.numel = a.numel / per;
  }
  const unsigned grid = grid_for((c.numel + kCopyUnroll - 1) / kCopyUnroll);
  switch (w) {
    case 1: launch_copy<kPacked, RawMove<uint8_t>>(c, grid, s); break;
    case 2: launch_copy<kPacked, RawMove<uint16_t>>(c, grid, s); break;
    case 4: launch_copy<kPacked, RawMove<uint32_t>>(c, grid, s); break;
    case 8: launch_copy<kPacked, RawMove<uint64_t>>(c, grid, s); break;
    default: launch_copy<kPacked, RawMove<uint4>>(c, grid, s); break;
  }
}

}  // namespace

int elementwise_launch(const ElementwiseArgs& a, void* stream) {
  if (a.numel == 0) return cudaSuccess;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (a.family == kCopy && !a.in[0].is_scalar && !vectorizable(a)) {
    copy_launch(a, s);
  } else if (vectorizable(a)) {
    const int vec = a.out_dtype == kF32 ? 4 : 8;
    const unsigned grid = grid_for((a.numel + vec - 1) / vec);
    if (a.out_dtype == kF32) vectorized_kernel<float><<<grid, kThreads, 0, s>>>(a);
    else if (a.out_dtype == kF16) vectorized_kernel<__half><<<grid, kThreads, 0, s>>>(a);
    else vectorized_kernel<__nv_bfloat16><<<grid, kThreads, 0, s>>>(a);
  } else if (a.compute == kComputeF32) {
    launch_strided<float>(a, s);
  } else if (a.compute == kComputeF64) {
    launch_strided<double>(a, s);
  } else {
    launch_strided<int64_t>(a, s);
  }
  return cudaGetLastError();
}

}  // namespace ops
}  // namespace cutegrad
