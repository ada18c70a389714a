// Gather and scatter along one dimension: the kernels behind gather,
// index_select, scatter_add, index_add, advanced indexing (x[idx],
// x[idx] = v, x[idx] += v), embedding lookups and one_hot.
//
// Design: one thread per position of the iteration shape (the index's shape
// for gather/scatter; index_select/index_add view their 1-D index with
// stride 0 on every other dimension, so the same kernels serve).  The
// coordinates of a position are dotted with each operand's strides; along
// `dim` the source (gather) or destination (scatter) coordinate is the index
// value.  Advanced indexing arrives as a 1-D gather/scatter over the storage
// with precomputed element offsets.  Index values outside [0, dim_size) are
// skipped (gather writes 0), so a bad index never touches memory it does not
// own, and recorded in the device's IndexErrorRecord (pinned host memory
// mapped into the device; the first bad index wins by atomicCAS on its flag).
// The frontend does not read index tensors back to check them: that would be
// a host sync per op and impossible under graph capture. The host raises the
// recorded error at its next wait for the device (frontend/cuda/index_errors.py).
// Advanced-indexing offsets are computed and checked on the host and launch
// without a record.
// Scatter with accumulate uses atomics (fp32, fp64, fp16, bf16, int32,
// int64), so the summation order of duplicate indices is not fixed; half
// types accumulate in an fp32 copy made by the frontend, rounding once.
//
// index_add along dim 0 with a 1-D index (the embedding backward) has a
// deterministic path: a stable sort of the index, then one thread per (run of
// equal indices, column) adding its run in index order with a single write per
// destination element.  The sort orders unique keys (row, position), so any
// sort is stable.  When n <= 8192 and the key packs into 31 bits (a training
// step's tokens: 8192 x a 50304-row vocabulary fits), one block bitonic-sorts
// them in 32 KiB of shared memory (O(n log^2 n) work, ~90 barrier steps): two
// launches with the run sums.  Larger n: 64-bit keys, blocks bitonic-sort
// chunks of 4096, then log2(chunks) merge passes in which every key finds its
// place by a binary search in its partner run (no ties: keys are unique), then
// one pass unpacks the permutation: O(n log n) work in 2 + ceil(log2(n / 4096))
// launches plus the run sums.  Out-of-range indices sort as one past the last
// row and are reported by the run sums.
//
// AOT specializations: gather by element size (1, 2, 4, 8 bytes); scatter
// with a double or int64 compute type; the two sorts; run sums in fp32 and fp64.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "dtype_access.h"
#include "index_errors.h"
#include "ops_args.h"

namespace cutegrad {
namespace ops {
namespace {

constexpr int kThreads = 256;

struct Offsets {
  int64_t index, src, dst;
  int64_t coord_dim;
};

__device__ __forceinline__ Offsets offsets_of(const IndexArgs& a, int64_t p) {
  Offsets o{0, 0, 0, 0};
  for (int d = a.ndim - 1; d >= 0; --d) {
    const int64_t c = p % a.sizes[d];
    p /= a.sizes[d];
    o.index += c * a.index_strides[d];
    if (d == a.dim) {
      o.coord_dim = c;
    }
    o.src += c * a.src_strides[d];
    o.dst += c * a.dst_strides[d];
  }
  return o;
}

template <typename E>
__global__ void __launch_bounds__(kThreads) gather_kernel(const IndexArgs a) {
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; p < a.numel;
       p += static_cast<int64_t>(gridDim.x) * kThreads) {
    const Offsets o = offsets_of(a, p);
    const int64_t idx = load_as<int64_t>(a.index, a.index_dtype, o.index);
    E v{};
    if (idx >= 0 && idx < a.dim_size) {
      const int64_t src = o.src + (idx - o.coord_dim) * a.src_strides[a.dim];
      v = static_cast<const E*>(a.src)[src];
    } else {
      report_bad_index(a.error, a.error_op, a.error_dim, idx, a.dim_size);
    }
    static_cast<E*>(a.dst)[o.dst] = v;
  }
}

template <typename C>
__device__ __forceinline__ void atomic_add_as(void* base, int dtype, int64_t off, C v) {
  switch (dtype) {
    case kF32: atomicAdd(static_cast<float*>(base) + off, static_cast<float>(v)); break;
    case kF64: atomicAdd(static_cast<double*>(base) + off, static_cast<double>(v)); break;
    case kF16: atomicAdd(static_cast<__half*>(base) + off, __float2half_rn(static_cast<float>(v))); break;
    case kBF16: atomicAdd(static_cast<__nv_bfloat16*>(base) + off, __float2bfloat16_rn(static_cast<float>(v))); break;
    case kI32: atomicAdd(static_cast<int*>(base) + off, static_cast<int>(v)); break;
    default:  // kI64: two's complement addition is the same on unsigned words
      atomicAdd(reinterpret_cast<unsigned long long*>(static_cast<int64_t*>(base) + off),
                static_cast<unsigned long long>(static_cast<int64_t>(v)));
      break;
  }
}

template <typename C>
__global__ void __launch_bounds__(kThreads) scatter_kernel(const IndexArgs a) {
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; p < a.numel;
       p += static_cast<int64_t>(gridDim.x) * kThreads) {
    const Offsets o = offsets_of(a, p);
    const int64_t idx = load_as<int64_t>(a.index, a.index_dtype, o.index);
    if (idx < 0 || idx >= a.dim_size) {
      report_bad_index(a.error, a.error_op, a.error_dim, idx, a.dim_size);
      continue;
    }
    const int64_t dst = o.dst + (idx - o.coord_dim) * a.dst_strides[a.dim];
    C v;
    if (a.src_is_scalar) {
      if constexpr (std::is_floating_point<C>::value) v = static_cast<C>(a.scalar_f); else v = static_cast<C>(a.scalar_i);
    } else {
      v = load_as<C>(a.src, a.src_dtype, o.src);
    }
    if (a.accumulate) atomic_add_as<C>(a.dst, a.dst_dtype, dst, v);
    else store_from<C>(a.dst, a.dst_dtype, dst, v);
  }
}


constexpr int kSortMax = 8192;
constexpr int kSortThreads = 1024;

// Bits needed to write v >= 0.
int bits_of(int64_t v) {
  int b = 0;
  while (v >> b) ++b;
  return b;
}

// The block's threads sort keys[0, m) ascending in shared memory, m a power of two.
template <typename K>
__device__ void block_bitonic_sort(K* keys, int m) {
  for (int k = 2; k <= m; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = threadIdx.x; i < m; i += blockDim.x) {
        const int l = i ^ j;
        if (l > i) {
          const K x = keys[i], y = keys[l];
          if ((x > y) == ((i & k) == 0)) {
            keys[i] = y;
            keys[l] = x;
          }
        }
      }
      __syncthreads();
    }
  }
}

// The row an index sorts under: its value, or one past the last row when out of range.
__device__ __forceinline__ int64_t sort_row(const IndexAddRowsArgs& a, int64_t i) {
  const int64_t v = a.index[i];
  return (v < 0 || v >= a.rows) ? a.rows : v;
}

// One block: sort keys (row << shift | position) ascending, row = the index value
// (rows for an out-of-range one), so equal rows keep their positions' order.
__global__ void __launch_bounds__(kSortThreads) bitonic_sort_rows_kernel(const IndexAddRowsArgs a, int shift) {
  __shared__ uint32_t keys[kSortMax];
  int m = 1;
  while (m < a.n) m <<= 1;
  for (int i = threadIdx.x; i < m; i += kSortThreads) {
    uint32_t key = 0xFFFFFFFFu;  // padding sorts after every real key (those fit in 31 bits)
    if (i < a.n) key = (static_cast<uint32_t>(sort_row(a, i)) << shift) | static_cast<uint32_t>(i);
    keys[i] = key;
  }
  __syncthreads();
  block_bitonic_sort(keys, m);
  const uint32_t mask = (1u << shift) - 1u;
  for (int r = threadIdx.x; r < a.n; r += kSortThreads) {
    const int64_t i = keys[r] & mask;
    a.perm[r] = i;
    a.sorted[r] = a.index[i];
  }
}

constexpr int kChunk = 4096;  // 64-bit keys per block of the large sort: 32 KiB of shared memory

__device__ __forceinline__ uint64_t row_key(const IndexAddRowsArgs& a, int64_t i) {
  return (static_cast<uint64_t>(sort_row(a, i)) << 32) | static_cast<uint64_t>(i);
}

// Block b sorts keys [b * kChunk, min(n, (b + 1) * kChunk)) ascending into out.
__global__ void __launch_bounds__(kSortThreads) chunk_sort_kernel(const IndexAddRowsArgs a, uint64_t* out) {
  __shared__ uint64_t keys[kChunk];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int len = static_cast<int>(a.n - base < kChunk ? a.n - base : kChunk);
  int m = 1;
  while (m < len) m <<= 1;
  for (int i = threadIdx.x; i < m; i += kSortThreads) keys[i] = i < len ? row_key(a, base + i) : ~uint64_t(0);
  __syncthreads();
  block_bitonic_sort(keys, m);
  for (int i = threadIdx.x; i < len; i += kSortThreads) out[base + i] = keys[i];
}

// Merges sorted runs of `width` pairwise: a key's place in the merged run is its
// index in its own run plus the number of keys below it in the partner run.
__global__ void __launch_bounds__(kThreads) merge_runs_kernel(const uint64_t* in, uint64_t* out, int64_t n,
                                                                int64_t width) {
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; p < n;
       p += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t run = p / width, start = run * width;
    const int64_t partner = (run ^ 1) * width;
    const int64_t merged = (run & ~int64_t(1)) * width;
    const uint64_t key = in[p];
    int64_t lo = 0;
    if (partner < n) {
      int64_t hi = (partner + width < n ? partner + width : n) - partner;
      while (lo < hi) {  // keys of the partner run below `key`
        const int64_t mid = (lo + hi) >> 1;
        if (in[partner + mid] < key) lo = mid + 1; else hi = mid;
      }
    }
    out[merged + (p - start) + lo] = key;
  }
}

// perm[r] = position of the r-th key, sorted[r] = its index value; `keys` is
// perm or sorted itself (each thread reads its own slot before writing it).
__global__ void __launch_bounds__(kThreads) unpack_keys_kernel(const IndexAddRowsArgs a, const uint64_t* keys) {
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; r < a.n;
       r += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t i = static_cast<int64_t>(keys[r] & 0xFFFFFFFFull);
    a.perm[r] = i;
    a.sorted[r] = a.index[i];
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) run_sum_kernel(const IndexAddRowsArgs a) {
  const int64_t total = a.n * a.cols;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t r = e / a.cols, c = e % a.cols;
    const int64_t v = a.sorted[r];
    if (r > 0 && a.sorted[r - 1] == v) continue;  // not the start of a run
    if (v < 0 || v >= a.rows) {
      if (c == 0) report_bad_index(a.error, a.error_op, 0, v, a.rows);
      continue;
    }
    T acc = T(0);
    for (int64_t q = r; q < a.n && a.sorted[q] == v; ++q) acc += static_cast<const T*>(a.src)[a.perm[q] * a.cols + c];
    static_cast<T*>(a.dst)[v * a.cols + c] += acc;
  }
}

unsigned grid_for(int64_t n) {
  int64_t blocks = (n + kThreads - 1) / kThreads;
  const int64_t cap = int64_t(1) << 20;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks < cap ? blocks : cap));
}

int element_size(int dtype) {
  switch (dtype) {
    case kBool: case kU8: case kI8: return 1;
    case kI16: case kF16: case kBF16: return 2;
    case kI32: case kF32: return 4;
    default: return 8;
  }
}

}  // namespace

int gather_launch(const IndexArgs& a, void* stream) {
  if (a.numel == 0) return cudaSuccess;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (element_size(a.src_dtype)) {
    case 1: gather_kernel<uint8_t><<<grid_for(a.numel), kThreads, 0, s>>>(a); break;
    case 2: gather_kernel<uint16_t><<<grid_for(a.numel), kThreads, 0, s>>>(a); break;
    case 4: gather_kernel<uint32_t><<<grid_for(a.numel), kThreads, 0, s>>>(a); break;
    default: gather_kernel<uint64_t><<<grid_for(a.numel), kThreads, 0, s>>>(a); break;
  }
  return cudaGetLastError();
}

int scatter_launch(const IndexArgs& a, void* stream) {
  if (a.numel == 0) return cudaSuccess;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool is_float = a.dst_dtype == kF16 || a.dst_dtype == kBF16 || a.dst_dtype == kF32 || a.dst_dtype == kF64;
  if (is_float) scatter_kernel<double><<<grid_for(a.numel), kThreads, 0, s>>>(a);
  else scatter_kernel<int64_t><<<grid_for(a.numel), kThreads, 0, s>>>(a);
  return cudaGetLastError();
}

int index_add_rows_launch(const IndexAddRowsArgs& a, void* stream) {
  if (a.n == 0 || a.cols == 0) return cudaSuccess;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int shift = bits_of(a.n - 1);
  if (a.n <= kSortMax && a.rows < INT32_MAX && bits_of(a.rows) + shift <= 31) {
    bitonic_sort_rows_kernel<<<1, kSortThreads, 0, s>>>(a, shift);
  } else {
    if (a.n > UINT32_MAX || a.rows >= UINT32_MAX) return cudaErrorInvalidValue;  // the frontend never asks
    // perm and sorted, n int64 each, serve as the two key buffers of the merge passes.
    uint64_t* from = reinterpret_cast<uint64_t*>(a.perm);
    uint64_t* to = reinterpret_cast<uint64_t*>(a.sorted);
    chunk_sort_kernel<<<static_cast<unsigned>((a.n + kChunk - 1) / kChunk), kSortThreads, 0, s>>>(a, from);
    for (int64_t width = kChunk; width < a.n; width <<= 1) {
      merge_runs_kernel<<<grid_for(a.n), kThreads, 0, s>>>(from, to, a.n, width);
      uint64_t* t = from;
      from = to;
      to = t;
    }
    unpack_keys_kernel<<<grid_for(a.n), kThreads, 0, s>>>(a, from);
  }
  if (a.dtype == kF64) run_sum_kernel<double><<<grid_for(a.n * a.cols), kThreads, 0, s>>>(a);
  else run_sum_kernel<float><<<grid_for(a.n * a.cols), kThreads, 0, s>>>(a);
  return cudaGetLastError();
}

}  // namespace ops
}  // namespace cutegrad
