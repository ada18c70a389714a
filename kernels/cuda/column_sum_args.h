// Launch arguments of the one-launch column sum (column_sum.cu), shared with its bindings.
#pragma once
#include <cstdint>

namespace cutegrad {
namespace ops {

// out[c] = sum over r of in[r * cols + c] for a contiguous (rows, cols) input: a linear
// layer's bias gradient.  splits > 1: block (tile, s) sums rows of split s into
// partials[s * cols + c]; the last block of each column tile to finish (counters[tile],
// zero on entry and reset by that block) adds the partials in split order, so the result is
// deterministic and the whole sum is one launch.
struct ColumnSumArgs {
  const void* in;
  int in_dtype;
  void* out;
  int out_dtype;
  int64_t rows, cols;
  int splits;
  void* partials;         // splits * cols accumulators (float, or double for float64); splits > 1 only
  unsigned int* counters;  // one per 32-column tile, zero on entry; splits > 1 only
};

int column_sum_launch(const ColumnSumArgs& args, void* stream);

}  // namespace ops
}  // namespace cutegrad
