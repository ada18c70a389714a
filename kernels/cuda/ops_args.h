// Plain-data descriptions of the non-GEMM CUDA kernels (elementwise, reductions,
// softmax, norms, indexing, random), shared by the nanobind bindings (host
// compiler) and the kernels (nvcc).  No CUDA or Python headers here: the two
// sides are compiled by different compilers.  Every launch function validates
// nothing (ops_bindings.cpp does that before calling it) and returns a
// cudaError_t as int.
//
// Conventions: strides and offsets count elements; pointers already include
// the tensor's storage offset; dtype codes are cutegrad's DType.index.
#pragma once
#include <cstdint>

#include "op_codes.h"  // generated from frontend/ops/codes.py by setup.py: ReduceCode, codes::UnaryCode/BinaryCode

namespace cutegrad {
namespace ops {

constexpr int kMaxDims = 12;

// cutegrad.dtypes: DType.index of each dtype.
enum DTypeCode : int { kBool = 0, kU8, kI8, kI16, kI32, kI64, kF16, kBF16, kF32, kF64, kNumDTypes };

// Arithmetic type a kernel computes in: half types compute in fp32 and round once.
enum Compute : int { kComputeF32 = 0, kComputeF64 = 1, kComputeI64 = 2 };

// ---- elementwise ----------------------------------------------------------

enum Family : int { kUnary = 0, kBinary = 1, kWhere = 2, kClamp = 3, kActBackward = 4, kCopy = 5, kArange = 6 };

struct Operand {
  const void* data;  // null for a scalar
  int dtype;
  int is_scalar;
  double scalar_f;
  int64_t scalar_i;
  int64_t strides[kMaxDims];
};

// out[i] = f(in[0][i], in[1][i], in[2][i]) over `sizes` (already coalesced).
struct ElementwiseArgs {
  int ndim;
  int nin;
  int family;
  int code;  // cutegrad.ops.codes value (unary/binary/activation code)
  int compute;
  int64_t numel;
  int64_t sizes[kMaxDims];
  void* out;
  int out_dtype;
  int64_t out_strides[kMaxDims];
  Operand in[3];
  // clamp bounds (p0, p1 / i0, i1 with has_lo/has_hi); arange start and step.
  double p0, p1;
  int64_t i0, i1;
  int has_lo, has_hi;
};

int elementwise_launch(const ElementwiseArgs& args, void* stream);

// ---- reductions -----------------------------------------------------------

// The reduce codes (ReduceCode: kSum, ..., kVar, kLogSumExp) come from op_codes.h.

// out[o] = reduce over r of in[kept(o) + red(r)]; out is contiguous (index o).
struct ReduceArgs {
  const void* in;
  int in_dtype;
  void* out;
  int out_dtype;
  int code;
  int compute;
  int n_kept;
  int64_t kept_sizes[kMaxDims];
  int64_t kept_strides[kMaxDims];
  int n_red;
  int64_t red_sizes[kMaxDims];
  int64_t red_strides[kMaxDims];
  int64_t n_out;
  int64_t n_reduce;
  double correction;  // var: divide by max(n - correction, 0)
  int inner;          // reduced dims are the fastest in memory: lanes walk r
  void* workspace;    // per-chunk partials of a two-stage reduction (may be null)
  int64_t workspace_bytes;
};

// Two-stage reductions (reduce.cu, norms.cu): when the outputs alone give too
// few blocks, the reduced extent is cut into `split` chunks, each chunk's
// partial goes to a workspace the frontend allocates, and a second launch
// combines the partials in a fixed order (deterministic, no atomics).  `tiles`
// is the number of blocks without splitting, `min_chunk` the fewest reduced
// elements a chunk may have, `acc_bytes` the workspace bytes per output and
// chunk.  The split only ever shrinks to fit the workspace, so a smaller (or
// absent) workspace is slower, never wrong.  frontend/backends/cuda.py sizes
// the workspace from an upper bound of this function; keep the two in step.
constexpr int64_t kSplitTargetBlocks = 1024;
constexpr int64_t kSplitMax = 1024;

inline int64_t reduce_split(int64_t tiles, int64_t n_out, int64_t n_reduce, int64_t min_chunk, int64_t acc_bytes,
                            int64_t workspace_bytes) {
  if (n_out <= 0 || tiles >= kSplitTargetBlocks / 2 || n_reduce < 2 * min_chunk) return 1;
  int64_t split = (kSplitTargetBlocks + tiles - 1) / tiles;
  if (split > n_reduce / min_chunk) split = n_reduce / min_chunk;
  if (split > kSplitMax) split = kSplitMax;
  const int64_t fit = workspace_bytes / (n_out * acc_bytes);
  if (split > fit) split = fit;
  if (split < 2) return 1;
  const int64_t chunk = (n_reduce + split - 1) / split;
  return (n_reduce + chunk - 1) / chunk;  // no empty chunk
}

int reduce_launch(const ReduceArgs& args, void* stream);

// ---- softmax and norms (contiguous rows) ----------------------------------

// x, y contiguous, viewed as (outer, n, inner); softmax along n.
// causal_rows = L > 0 (inner == 1 only): row r keeps columns j <= r mod L,
// the rest are -inf (written 0 / -inf); 0 = no mask.
struct SoftmaxArgs {
  const void* x;
  void* y;
  int dtype;
  int64_t outer, n, inner;
  int log;
  int64_t causal_rows;
};

int softmax_launch(const SoftmaxArgs& args, void* stream);

// y (the forward's output), dy, dx contiguous, one dtype, viewed as (outer, n, inner):
// dx = y * (dy - sum_n(dy * y)), or dy - exp(y) * sum_n(dy) for log_softmax.
struct SoftmaxBackwardArgs {
  const void* y;
  const void* dy;
  void* dx;
  int dtype;
  int64_t outer, n, inner;
  int log;
};

int softmax_backward_launch(const SoftmaxBackwardArgs& args, void* stream);

// x, y contiguous (rows, n); weight/bias contiguous (n) or null; mean/rstd (rows).
struct NormArgs {
  const void* x;
  void* y;
  int dtype;
  const void* weight;
  int weight_dtype;
  const void* bias;
  int bias_dtype;
  void* mean;  // null for rms_norm
  void* rstd;
  int stat_dtype;  // kF32, or kF64 for float64 inputs
  int64_t rows, n;
  double eps;
  int rms;
};

int norm_launch(const NormArgs& args, void* stream);

// Backward of norm_launch from its saved statistics: with xhat = (x - mean) rstd
// (rms: x rstd) and h = dy * weight,
//   dx = rstd (h - mean(h) - xhat mean(h xhat))   (rms: rstd (h - xhat mean(h xhat)))
//   dweight = sum over rows of dy xhat,  dbias = sum over rows of dy.
// dy, x, dx contiguous (rows, n); dweight/dbias (n) in their own dtypes, null when not wanted.
struct NormBackwardArgs {
  const void* dy;
  const void* x;
  int dtype;  // of dy, x and dx
  const void* weight;
  int weight_dtype;
  const void* mean;  // null for rms_norm
  const void* rstd;
  int stat_dtype;
  void* dx;
  void* dweight;
  int dweight_dtype;
  void* dbias;
  int dbias_dtype;
  int64_t rows, n;
  int rms;
  void* workspace;  // per-chunk dweight/dbias partials (see reduce_split; may be null)
  int64_t workspace_bytes;
};

int norm_backward_launch(const NormBackwardArgs& args, void* stream);

// ---- gather / scatter -----------------------------------------------------

// The deferred bounds error of a device (frontend/cuda/index_errors.py):
// page-locked host memory mapped into the device, at one address for the
// whole process, so captured graphs write to it on every replay. flag 0 means
// no error; the first thread to find an index outside [0, size) claims it
// (report_bad_index in index_errors.h)
// (0 -> -1 by atomicCAS), writes the details, then publishes flag 1. The host
// reads and clears it when it waits for the device anyway. Layout is shared
// with the Python ctypes mirror: keep the two in step.
struct IndexErrorRecord {
  int flag;
  int op;   // 1 gather, 2 index_select, 3 scatter_add, 4 index_add, 5 one_hot, 6 cross_entropy
  int dim;  // the dimension reported in the message
  int reserved;
  int64_t index;
  int64_t size;
};

// For every position p of `sizes` (C order): with c = coordinates of p,
//   gather:  out[p contiguous] = src[sum_d c_d * src_strides_d, with c_dim
//            replaced by index[c . index_strides]]
//   scatter: dst[same, with dst strides] (+)= src[c . src_strides]
struct IndexArgs {
  int ndim;
  int64_t sizes[kMaxDims];
  int dim;
  int64_t dim_size;  // extent of dst/src along dim: index values outside [0, dim_size) are skipped (and reported)
  const void* index;
  int index_dtype;
  int64_t index_strides[kMaxDims];
  void* dst;
  int dst_dtype;
  int64_t dst_strides[kMaxDims];
  const void* src;
  int src_dtype;
  int64_t src_strides[kMaxDims];
  int src_is_scalar;
  double scalar_f;
  int64_t scalar_i;
  int accumulate;  // scatter: add instead of assign
  int64_t numel;
  IndexErrorRecord* error;  // null: skip bad indices silently (keys checked on the host)
  int error_op, error_dim;
};

int gather_launch(const IndexArgs& args, void* stream);
int scatter_launch(const IndexArgs& args, void* stream);

// Deterministic index_add along the first dimension (the embedding backward):
// dst (rows, cols) contiguous += src (n, cols) contiguous at rows index[0..n).
// The index is stably ranked (perm/sorted: n int64 scratch each), then one
// thread per (run of equal indices, column) sums its run in index order and
// adds once, so results do not depend on scheduling.
struct IndexAddRowsArgs {
  void* dst;
  int dtype;  // dst and src: kF32 or kF64
  const void* src;
  const int64_t* index;
  int64_t n, rows, cols;
  int64_t* perm;
  int64_t* sorted;
  IndexErrorRecord* error;  // may be null
  int error_op;
};

int index_add_rows_launch(const IndexAddRowsArgs& args, void* stream);

// ---- random (counter-based Philox4x32-10) ---------------------------------

enum RandomKind : int { kUniform = 0, kNormal = 1, kRandint = 2, kBernoulliScaled = 3 };

// Value v of the launch is lane v % 4 of Philox(key = seed, counter = offset / 4 + v / 4),
// with seed = seed_ptr ? *seed_ptr : seed and offset = (offset_ptr ? *offset_ptr : 0) + offset.
struct RandomArgs {
  void* out;
  int dtype;
  int kind;
  int64_t n;
  uint64_t seed;
  const void* seed_ptr;
  uint64_t offset;
  const void* offset_ptr;
  double a, b;         // uniform [a, b); normal mean a, std b; bernoulli keep a, scale b
  int64_t low, range;  // randint: low + (x mod range), range <= 2^32
};

int random_launch(const RandomArgs& args, void* stream);

// ---- fused optimizers (multi-tensor) --------------------------------------

constexpr int kMaxTensorsPerLaunch = 48;

// One launch covers up to kMaxTensorsPerLaunch tensors; block b works on chunk
// (b - block_start[t]) of tensor t, where block_start is the prefix sum of
// each tensor's chunk count.  Parameters and optimizer states share one dtype
// per launch (fp32, fp16 or bf16; math in fp32), gradients have their own.
struct MultiTensorArgs {
  int count;
  int64_t chunk;  // elements per block
  int64_t numel[kMaxTensorsPerLaunch];
  int64_t block_start[kMaxTensorsPerLaunch + 1];
  void* param[kMaxTensorsPerLaunch];
  const void* grad[kMaxTensorsPerLaunch];
  void* state0[kMaxTensorsPerLaunch];  // Adam exp_avg, SGD momentum buffer (null: no momentum)
  void* state1[kMaxTensorsPerLaunch];  // Adam exp_avg_sq
  float* step[kMaxTensorsPerLaunch];   // Adam: each tensor's fp32 step counter on the device (null: the host step)
  int param_dtype, grad_dtype;
  // AdamW/SGD: where to also write the updated parameter rounded to shadow_dtype
  // (the low-precision copy autocast's next forward reads; null: none).
  void* shadow[kMaxTensorsPerLaunch];
  int shadow_dtype;
};

// Adam / AdamW (torch.optim's order): AdamW: p *= 1 - lr*wd; Adam: g += wd p;
// m += (g - m)(1 - b1); v = b2 v + (1 - b2) g^2;
// p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
// t is *step[tensor] when the launch carries device step counters (graph
// capture: the replay reads the current count), else the host step.
// lr is *lr_ptr when set (a device scalar a schedule updates between replays).
// Every gradient is first multiplied by *grad_scale when grad_scale is set
// (the clipping coefficient from grad_norm_launch) and negated when maximize.
struct AdamWHyper {
  double lr, beta1, beta2, eps, weight_decay;
  double step;
  const float* lr_ptr;
  const float* grad_scale;
  int maximize;
  int decoupled;  // 1: AdamW's decay of the parameter, 0: Adam's weight decay added to the gradient
};

// SGD (torch.optim.SGD): g += wd p; buf = first ? g : momentum buf + (1 - dampening) g;
// g = nesterov ? g + momentum buf : buf; p -= lr g.  lr is *lr_ptr when set.
struct SGDHyper {
  double lr, momentum, dampening, weight_decay;
  int nesterov, first_step, maximize;
  const float* lr_ptr;
  const float* grad_scale;
};

int adamw_launch(const MultiTensorArgs& args, const AdamWHyper& h, void* stream);
int sgd_launch(const MultiTensorArgs& args, const SGDHyper& h, void* stream);
// *step[t] += 1 for every tensor of the launch that has a counter: launched
// before adamw_launch on the same stream, so every block of the update reads
// the incremented count (no block can race with the increment).
int step_increment_launch(const MultiTensorArgs& args, void* stream);
// param[t][i] *= *scale for every tensor of the launch (in the params' dtype, math in fp32).
int scale_launch(const MultiTensorArgs& args, const float* scale, void* stream);

// Squared L2 norm of every gradient of the launch, one partial per block into
// partial[block] (no atomics: a fixed summation order).
int sum_squares_launch(const MultiTensorArgs& args, float* partial, void* stream);
// out[0] = sqrt(sum of partial[0..n)), out[1] = min(1, max_norm / (out[0] + 1e-6)).
int norm_finish_launch(const float* partial, int64_t n, float* out, double max_norm, void* stream);

// ---- cross-entropy (fused log_softmax + NLL) --------------------------------

// logits contiguous (rows, classes); target int64 (rows).  Forward writes the
// per-row loss lse - (1 - ls) x[t] - ls * mean(x) (0 for ignored rows) and the
// row's logsumexp, both fp32.  Backward writes
//   grad[i, j] = g[i] * (softmax[i, j] - (1 - ls) [j == t] - ls / classes), 0 on ignored rows.
struct CrossEntropyArgs {
  const void* logits;
  int dtype;
  const int64_t* target;
  int64_t rows, classes;
  int64_t ignore_index;
  double label_smoothing;
  float* loss;     // forward
  float* lse;      // forward output, backward input
  const float* grad_rows;  // backward: upstream gradient per row
  void* grad_logits;       // backward output (logits dtype)
  IndexErrorRecord* error;  // forward: where a target outside [0, classes) is reported (may be null)
};

int cross_entropy_forward_launch(const CrossEntropyArgs& args, void* stream);
int cross_entropy_backward_launch(const CrossEntropyArgs& args, void* stream);

// ---- scan and sort along one dimension (contiguous (outer, n, inner)) -------

// out[o, i, k] = sum over j <= i of x[o, j, k], accumulated in the compute type.
struct ScanArgs {
  const void* x;
  int x_dtype;
  void* out;
  int out_dtype;
  int compute;
  int64_t outer, n, inner;
};

int cumsum_launch(const ScanArgs& args, void* stream);

// The first `count` entries of each (o, :, k) line in stable order (NaN largest),
// ascending or descending: values (x's dtype) and int64 positions, both
// contiguous (outer, count, inner).
struct SortArgs {
  const void* x;
  int dtype;
  void* values;
  int64_t* indices;
  int64_t outer, n, inner, count;
  int descending;
};

int sort_launch(const SortArgs& args, void* stream);

}  // namespace ops
}  // namespace cutegrad
