// report_bad_index: how a kernel records an out-of-range index in the
// device's IndexErrorRecord (ops_args.h; host side frontend/cuda/index_errors.py),
// for every kernel that reads an index or class value it cannot trust
// (index.cu; cross_entropy.cu may use it for targets, op code 6).
//
// Cold path, reached only by a bad index. The plain read first keeps a launch
// full of bad indices from hammering the mapped flag with atomics; the
// atomicCAS makes the first bad index win; the details are published (flag 1)
// after a system fence. Atomics on mapped host memory are atomic with respect
// to the device doing them, which is all this needs: the host reads the record
// only after waiting for the device.
#pragma once

#include <cstdint>

#include "ops_args.h"

namespace cutegrad {
namespace ops {

static __device__ __noinline__ void report_bad_index(IndexErrorRecord* r, int op, int dim, int64_t idx, int64_t size) {
  if (r == nullptr || *static_cast<volatile int*>(&r->flag) != 0) return;
  if (atomicCAS(&r->flag, 0, -1) != 0) return;
  r->op = op;
  r->dim = dim;
  r->index = idx;
  r->size = size;
  __threadfence_system();
  atomicExch(&r->flag, 1);
}

}  // namespace ops
}  // namespace cutegrad
