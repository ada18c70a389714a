// Launch arguments of the fused dropout kernel (dropout.cu), shared with its bindings.
#pragma once
#include <cstdint>

namespace cutegrad {
namespace ops {

// out[v] = in[v] * scale where Philox value v is kept (unit(lane) < keep), else 0; in and out
// are contiguous, of one floating dtype.  The forward applies it to x, the backward to dy
// with the same (seed, offset): the keep mask is regenerated, never stored.
struct DropoutArgs {
  const void* in;
  void* out;
  int dtype;
  int64_t n;
  uint64_t seed;
  const void* seed_ptr;
  uint64_t offset;
  const void* offset_ptr;
  float keep;    // keep probability 1 - p, compared in fp32 as the Bernoulli mask of random.cu does
  double scale;  // 1 / keep: fp32 math for 16/32-bit dtypes, fp64 for float64
};

int dropout_launch(const DropoutArgs& args, void* stream);

}  // namespace ops
}  // namespace cutegrad
