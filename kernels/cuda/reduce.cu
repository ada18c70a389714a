// Reductions over any set of dimensions: sum, mean, prod, max, min, any, all,
// argmax, argmin, var (Welford) and logsumexp (online max + rescaled sum).
//
// Design: the bindings split the input's dimensions into kept and reduced
// groups and merge contiguous dimensions inside each group, so an output
// index o and a reduction index r (both C-order, so argmax returns the flat
// index torch returns) each map to an input offset through at most a few
// multiply-adds.  One block of 256 threads covers several outputs:
//  * inner mode (reduced dims are the fastest in memory): threadIdx.x walks r
//    (coalesced along the row; up to 32 lanes per element for short rows, a
//    warp or more with ~8 elements per lane for longer ones), threadIdx.y
//    picks the output;
//  * outer mode (kept dims are the fastest): threadIdx.x picks up to 32
//    consecutive outputs (coalesced across outputs), threadIdx.y splits r.
// The r-lanes of one output combine through shared memory in a fixed tree.
//
// Two stages when the outputs alone give too few blocks (column sums of tall
// gradients, full reductions): blockIdx.y cuts r into up to 1024 chunks
// (reduce_split in ops_args.h, >= 8 elements per lane), each block writes its
// partial accumulator to a workspace the frontend allocates on the same
// stream, and reduce_finish_kernel combines the partials of each output in a
// fixed order.  No atomics and no memset: the result has the same bits on
// every run and the launch pair is graph-capturable.  Without a large enough
// workspace the split shrinks (down to one launch), never the correctness.
//
// Contiguous row sums/means (fp32 accumulation, last dimension, 16-byte rows)
// take row_sum_vec_kernel instead: a warp per row with 16-byte loads.
//
// Accumulation is fp32 for half and fp32 inputs, fp64 for fp64, int64 for
// integer sums.  Lanes visit r in increasing order and ties combine towards
// the lower index, so argmax/argmin return the first extremum (also across
// chunks); NaN counts as the extremum and propagates through max/min, as in
// NumPy.
//
// AOT specializations: sum/mean/prod (fp32, fp64, int64 accumulators),
// max/min (fp32, fp64, int64), any/all, argmax/argmin (fp32, fp64, int64),
// var and logsumexp (fp32, fp64); each with its finishing kernel.  Sum/mean
// with fp32 accumulation also come per input dtype (fp32, bf16, fp16: plain
// loads instead of the runtime dtype switch).
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "dtype_access.h"
#include "ops_args.h"

namespace cutegrad {
namespace ops {
namespace {

constexpr int kThreads = 256;
// A split chunk gives every r-lane at least this many elements.
constexpr int kMinPerLane = 8;

template <typename C> struct SumOp {
  using Acc = C;
  __device__ static Acc init() { return C(0); }
  __device__ static Acc step(Acc a, C v, int64_t) { return a + v; }
  __device__ static Acc combine(Acc a, Acc b) { return a + b; }
  __device__ static void store(const ReduceArgs& r, int64_t o, Acc a) {
    if (r.code == kMean) store_from<C>(r.out, r.out_dtype, o, a / static_cast<C>(r.n_reduce));
    else store_from<C>(r.out, r.out_dtype, o, a);
  }
};

template <typename C> struct ProdOp {
  using Acc = C;
  __device__ static Acc init() { return C(1); }
  __device__ static Acc step(Acc a, C v, int64_t) { return a * v; }
  __device__ static Acc combine(Acc a, Acc b) { return a * b; }
  __device__ static void store(const ReduceArgs& r, int64_t o, Acc a) { store_from<C>(r.out, r.out_dtype, o, a); }
};

template <typename C> __device__ __forceinline__ C lowest() {
  if constexpr (std::is_floating_point<C>::value) return -m_inf<C>(); else return INT64_MIN;
}
template <typename C> __device__ __forceinline__ C highest() {
  if constexpr (std::is_floating_point<C>::value) return m_inf<C>(); else return INT64_MAX;
}

// a "beats" b for max (is_max) or min; NaN beats everything.
template <typename C> __device__ __forceinline__ bool beats(C a, C b, bool is_max) {
  if (m_isnan(a)) return !m_isnan(b);
  if (m_isnan(b)) return false;
  return is_max ? a > b : a < b;
}

template <typename C, bool IsMax> struct ExtremumOp {
  using Acc = C;
  __device__ static Acc init() { return IsMax ? lowest<C>() : highest<C>(); }
  __device__ static Acc step(Acc a, C v, int64_t) { return beats(v, a, IsMax) ? v : a; }
  __device__ static Acc combine(Acc a, Acc b) { return beats(b, a, IsMax) ? b : a; }
  __device__ static void store(const ReduceArgs& r, int64_t o, Acc a) { store_from<C>(r.out, r.out_dtype, o, a); }
};

template <typename C, bool IsAll> struct LogicalOp {
  using Acc = int;
  __device__ static Acc init() { return IsAll ? 1 : 0; }
  __device__ static Acc step(Acc a, C v, int64_t) { return IsAll ? (a && v != C(0)) : (a || v != C(0)); }
  __device__ static Acc combine(Acc a, Acc b) { return IsAll ? (a && b) : (a || b); }
  __device__ static void store(const ReduceArgs& r, int64_t o, Acc a) { store_from<int64_t>(r.out, r.out_dtype, o, a); }
};

template <typename C> struct ValIdx {
  C val;
  int64_t idx;  // -1: nothing seen yet
};

template <typename C, bool IsMax> struct ArgOp {
  using Acc = ValIdx<C>;
  __device__ static Acc init() { return Acc{C(0), -1}; }
  __device__ static Acc step(Acc a, C v, int64_t r) {
    if (a.idx < 0 || beats(v, a.val, IsMax)) return Acc{v, r};
    return a;
  }
  __device__ static Acc combine(Acc a, Acc b) {
    if (b.idx < 0) return a;
    if (a.idx < 0) return b;
    if (beats(b.val, a.val, IsMax)) return b;
    if (beats(a.val, b.val, IsMax)) return a;
    return b.idx < a.idx ? b : a;  // equal (or both NaN): the first occurrence
  }
  __device__ static void store(const ReduceArgs& r, int64_t o, Acc a) { static_cast<int64_t*>(r.out)[o] = a.idx; }
};

template <typename C> struct Welford {
  C n, mean, m2;
};

template <typename C> struct VarOp {
  using Acc = Welford<C>;
  __device__ static Acc init() { return Acc{C(0), C(0), C(0)}; }
  __device__ static Acc step(Acc a, C v, int64_t) {
    a.n += C(1);
    C d = v - a.mean;
    a.mean += d / a.n;
    a.m2 += d * (v - a.mean);
    return a;
  }
  __device__ static Acc combine(Acc a, Acc b) {
    if (b.n == C(0)) return a;
    if (a.n == C(0)) return b;
    C n = a.n + b.n;
    C d = b.mean - a.mean;
    return Acc{n, a.mean + d * (b.n / n), a.m2 + b.m2 + d * d * (a.n * b.n / n)};
  }
  __device__ static void store(const ReduceArgs& r, int64_t o, Acc a) {
    C denom = a.n - static_cast<C>(r.correction);
    if (denom < C(0)) denom = C(0);
    store_from<C>(r.out, r.out_dtype, o, a.m2 / denom);
  }
};

template <typename C> struct MaxSum {
  C m, s;
};

// Online logsumexp; infinities and NaN follow the CPU reference (max taken as
// 0 when it is not finite): +inf -> +inf, all -inf -> -inf, NaN -> NaN.
template <typename C> struct LseOp {
  using Acc = MaxSum<C>;
  __device__ static Acc init() { return Acc{-m_inf<C>(), C(0)}; }
  __device__ static Acc step(Acc a, C v, int64_t) { return combine(a, Acc{v, C(1)}); }
  __device__ static Acc combine(Acc a, Acc b) {
    if (m_isnan(a.m) || m_isnan(b.m)) return Acc{a.m + b.m, C(1)};
    if (a.m == m_inf<C>() || b.m == m_inf<C>()) return Acc{m_inf<C>(), C(1)};
    if (b.m == -m_inf<C>()) return a;
    if (a.m == -m_inf<C>()) return b;
    if (a.m >= b.m) return Acc{a.m, a.s + b.s * m_exp(b.m - a.m)};
    return Acc{b.m, b.s + a.s * m_exp(a.m - b.m)};
  }
  __device__ static void store(const ReduceArgs& r, int64_t o, Acc a) {
    C v = (m_isnan(a.m) || m_fabs(a.m) == m_inf<C>()) ? a.m : a.m + m_log(a.s);
    store_from<C>(r.out, r.out_dtype, o, v);
  }
};

__device__ __forceinline__ int64_t offset_of(int64_t idx, int n, const int64_t* sizes, const int64_t* strides) {
  int64_t off = 0;
  for (int d = n - 1; d >= 0; --d) {
    const int64_t c = idx % sizes[d];
    idx /= sizes[d];
    off += c * strides[d];
  }
  return off;
}

// T = void reads through the runtime dtype switch; a concrete T (the hot
// sum/mean inputs) compiles to plain loads the unrolled loop can batch.
template <typename C, typename T>
__device__ __forceinline__ C load_elem(const void* p, int dtype, int64_t off) {
  if constexpr (std::is_void<T>::value) return load_as<C>(p, dtype, off);
  else return static_cast<C>(widen(static_cast<const T*>(p)[off]));
}

// Combines the r-lanes of a block (sm[tid] holds each lane's value) in a fixed
// tree; the result is in the r_lane == 0 slot of each output.
template <typename Op>
__device__ __forceinline__ void combine_lanes(typename Op::Acc* sm, int tid, int r_lane, int r_threads, int r_step) {
  for (int s = r_threads / 2; s > 0; s >>= 1) {
    if (r_lane < s) sm[tid] = Op::combine(sm[tid], sm[tid + s * r_step]);
    __syncthreads();
  }
}

// Stage 1: blockIdx.y picks the chunk [y * chunk, (y + 1) * chunk) of r.  With
// one chunk the block stores the result; otherwise it writes its partial to
// partial[y * n_out + o] for reduce_finish_kernel.
template <typename Op, typename C, typename T>
__global__ void __launch_bounds__(kThreads) reduce_kernel(const ReduceArgs a, int64_t chunk,
                                                          typename Op::Acc* partial) {
  using Acc = typename Op::Acc;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Acc* sm = reinterpret_cast<Acc*>(smem_raw);
  const int r_lane = a.inner ? threadIdx.x : threadIdx.y;
  const int r_threads = a.inner ? blockDim.x : blockDim.y;
  const int o_lane = a.inner ? threadIdx.y : threadIdx.x;
  const int o_threads = a.inner ? blockDim.y : blockDim.x;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int r_step = a.inner ? 1 : blockDim.x;  // distance in sm between neighbouring r-lanes
  const int64_t r_begin = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t r_end = r_begin + chunk < a.n_reduce ? r_begin + chunk : a.n_reduce;
  for (int64_t o0 = static_cast<int64_t>(blockIdx.x) * o_threads; o0 < a.n_out;
       o0 += static_cast<int64_t>(gridDim.x) * o_threads) {
    const int64_t o = o0 + o_lane;
    Acc acc = Op::init();
    if (o < a.n_out) {
      const int64_t base = offset_of(o, a.n_kept, a.kept_sizes, a.kept_strides);
      if (a.n_red == 1) {
        const int64_t st = a.red_strides[0];
        int64_t r = r_begin + r_lane;
        // Four loads issued before the four steps that use them (memory-level
        // parallelism); the steps still see r in increasing order.
        constexpr int kUnroll = 4;
        for (; r + (kUnroll - 1) * r_threads < r_end; r += kUnroll * r_threads) {
          C v[kUnroll];
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) v[u] = load_elem<C, T>(a.in, a.in_dtype, base + (r + u * r_threads) * st);
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) acc = Op::step(acc, v[u], r + u * r_threads);
        }
        for (; r < r_end; r += r_threads) acc = Op::step(acc, load_elem<C, T>(a.in, a.in_dtype, base + r * st), r);
      } else {
        for (int64_t r = r_begin + r_lane; r < r_end; r += r_threads)
          acc = Op::step(acc, load_elem<C, T>(a.in, a.in_dtype, base + offset_of(r, a.n_red, a.red_sizes, a.red_strides)),
                         r);
      }
    }
    sm[tid] = acc;
    __syncthreads();
    combine_lanes<Op>(sm, tid, r_lane, r_threads, r_step);
    if (r_lane == 0 && o < a.n_out) {
      if (partial) partial[blockIdx.y * a.n_out + o] = sm[tid];
      else Op::store(a, o, sm[tid]);
    }
    __syncthreads();
  }
}

// Stage 2: out[o] = combination of partial[0..split)[o]; block (32 outputs,
// 8 chunk-lanes) or narrower for few outputs, lanes combined in a fixed tree.
template <typename Op>
__global__ void __launch_bounds__(kThreads) reduce_finish_kernel(const ReduceArgs a, const typename Op::Acc* partial,
                                                                 int split) {
  using Acc = typename Op::Acc;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Acc* sm = reinterpret_cast<Acc*>(smem_raw);
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  for (int64_t o0 = static_cast<int64_t>(blockIdx.x) * blockDim.x; o0 < a.n_out;
       o0 += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = o0 + threadIdx.x;
    Acc acc = Op::init();
    if (o < a.n_out)
      for (int k = threadIdx.y; k < split; k += blockDim.y) acc = Op::combine(acc, partial[k * a.n_out + o]);
    sm[tid] = acc;
    __syncthreads();
    combine_lanes<Op>(sm, tid, threadIdx.y, blockDim.y, blockDim.x);
    if (threadIdx.y == 0 && o < a.n_out) Op::store(a, o, sm[tid]);
    __syncthreads();
  }
}

// Sum/mean over the last dimension of contiguous rows (bias-free row sums,
// per-row losses): one warp per row reading 16-byte vectors, lanes summing
// their vectors in order, then a butterfly over the warp; 8 rows per block.
template <typename T>
__global__ void __launch_bounds__(kThreads) row_sum_vec_kernel(const ReduceArgs a) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x & 31;
  const int64_t nvec = a.n_reduce / kVec;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); row < a.n_out;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    const uint4* p = reinterpret_cast<const uint4*>(static_cast<const T*>(a.in) + row * a.kept_strides[0]);
    float acc = 0.f;
#pragma unroll 4
    for (int64_t v = lane; v < nvec; v += 32) {
      const uint4 raw = p[v];
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < kVec; ++k) acc += widen(e[k]);
    }
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) SumOp<float>::store(a, row, acc);
  }
}

// Whether row_sum_vec_kernel<T> takes a: contiguous rows of a 16-byte multiple, 16-byte aligned.
template <typename T>
bool row_sum_vec_fits(const ReduceArgs& a) {
  constexpr int64_t kVec = 16 / sizeof(T);
  return a.inner && a.n_red == 1 && a.red_strides[0] == 1 && a.n_kept == 1 && a.n_reduce % kVec == 0 &&
         a.kept_strides[0] % kVec == 0 && reinterpret_cast<uintptr_t>(a.in) % 16 == 0;
}

template <typename T>
int launch_row_sum_vec(const ReduceArgs& a, cudaStream_t s) {
  const int64_t cap = int64_t(1) << 20;
  int64_t blocks = (a.n_out + kThreads / 32 - 1) / (kThreads / 32);
  row_sum_vec_kernel<T><<<static_cast<unsigned>(blocks < cap ? blocks : cap), kThreads, 0, s>>>(a);
  return cudaGetLastError();
}

// The smallest power of two >= v, but at most cap.
int pow2_at_most(int64_t v, int cap) {
  int p = 1;
  while (p < cap && p < v) p <<= 1;
  return p;
}

template <typename Op, typename C, typename T>
int launch(const ReduceArgs& a, cudaStream_t s) {
  using Acc = typename Op::Acc;
  dim3 block;
  int o_threads;
  if (a.inner) {
    // Rows up to 32 long get one lane per element; longer rows at least a
    // warp and about 8 elements per lane, so a row of a few hundred is one
    // warp's work instead of one element per thread of a whole block.
    const int64_t want = a.n_reduce <= 32 ? a.n_reduce : (a.n_reduce + kMinPerLane - 1) / kMinPerLane;
    const int r_threads = pow2_at_most(want < 32 && a.n_reduce > 32 ? 32 : want, kThreads);
    o_threads = kThreads / r_threads;
    block = dim3(r_threads, o_threads);
  } else {
    o_threads = pow2_at_most(a.n_out, 32);
    block = dim3(o_threads, kThreads / o_threads);
  }
  int64_t tiles = (a.n_out + o_threads - 1) / o_threads;
  const int r_threads = kThreads / o_threads;
  const int64_t split = reduce_split(tiles, a.n_out, a.n_reduce, int64_t(r_threads) * kMinPerLane, sizeof(Acc),
                                     a.workspace_bytes);
  const int64_t chunk = split > 1 ? (a.n_reduce + split - 1) / split : a.n_reduce;
  const int64_t cap = int64_t(1) << 20;
  if (tiles > cap) tiles = cap;
  if (tiles < 1) tiles = 1;
  Acc* partial = split > 1 ? static_cast<Acc*>(a.workspace) : nullptr;
  reduce_kernel<Op, C, T><<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(split)), block,
                            kThreads * sizeof(Acc), s>>>(a, chunk, partial);
  if (split > 1) {
    const int fo = pow2_at_most(a.n_out, 32);
    int64_t fblocks = (a.n_out + fo - 1) / fo;
    if (fblocks > cap) fblocks = cap;
    reduce_finish_kernel<Op><<<static_cast<unsigned>(fblocks), dim3(fo, kThreads / fo), kThreads * sizeof(Acc), s>>>(
        a, partial, static_cast<int>(split));
  }
  return cudaGetLastError();
}

template <typename C>
int launch_sum(const ReduceArgs& a, cudaStream_t s) {
  if constexpr (std::is_same<C, float>::value) {
    switch (a.in_dtype) {
      case kF32: if (row_sum_vec_fits<float>(a)) return launch_row_sum_vec<float>(a, s); break;
      case kBF16: if (row_sum_vec_fits<__nv_bfloat16>(a)) return launch_row_sum_vec<__nv_bfloat16>(a, s); break;
      case kF16: if (row_sum_vec_fits<__half>(a)) return launch_row_sum_vec<__half>(a, s); break;
      default: break;
    }
    switch (a.in_dtype) {
      case kF32: return launch<SumOp<C>, C, float>(a, s);
      case kBF16: return launch<SumOp<C>, C, __nv_bfloat16>(a, s);
      case kF16: return launch<SumOp<C>, C, __half>(a, s);
      default: break;
    }
  }
  return launch<SumOp<C>, C, void>(a, s);
}

template <typename C>
int launch_by_code(const ReduceArgs& a, cudaStream_t s) {
  switch (a.code) {
    case kSum: case kMean: return launch_sum<C>(a, s);
    case kProd: return launch<ProdOp<C>, C, void>(a, s);
    case kMax: return launch<ExtremumOp<C, true>, C, void>(a, s);
    case kMin: return launch<ExtremumOp<C, false>, C, void>(a, s);
    case kAny: return launch<LogicalOp<C, false>, C, void>(a, s);
    case kAll: return launch<LogicalOp<C, true>, C, void>(a, s);
    case kArgMax: return launch<ArgOp<C, true>, C, void>(a, s);
    case kArgMin: return launch<ArgOp<C, false>, C, void>(a, s);
    default:
      if constexpr (std::is_floating_point<C>::value) {
        if (a.code == kVar) return launch<VarOp<C>, C, void>(a, s);
        return launch<LseOp<C>, C, void>(a, s);
      }
      return cudaErrorInvalidValue;
  }
}

}  // namespace

int reduce_launch(const ReduceArgs& a, void* stream) {
  if (a.n_out == 0) return cudaSuccess;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (a.compute == kComputeF32) return launch_by_code<float>(a, s);
  if (a.compute == kComputeF64) return launch_by_code<double>(a, s);
  return launch_by_code<int64_t>(a, s);
}

}  // namespace ops
}  // namespace cutegrad
