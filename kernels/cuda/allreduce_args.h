// Plain-data description of one all-reduce launch, shared by the nanobind
// binding (kernels/cuda/allreduce_bindings.cpp) and the table of AOT CuTeDSL
// kernels generated from kernels/cute/allreduce.py.  No CUDA or Python headers.
#pragma once
#include <cstdint>

namespace cutegrad {

enum class ArDType : int { bf16 = 0, fp16 = 1, fp32 = 2 };
constexpr int kAllReduceMaxRanks = 8;

struct AllReduceArgs {
  void* in;                           // this rank's input (16-byte aligned)
  void* out;                          // this rank's output (may equal in)
  void* flags[kAllReduceMaxRanks];    // each rank's workspace base (flags region), as mapped here
  void* data[kAllReduceMaxRanks];     // each rank's data areas, as mapped here
  int32_t rank, world;
  int32_t n_vec;                      // message length in 16-byte vectors
  int32_t cap_vec;                    // vectors per data parity area
};

struct AllReduceKernelEntry {
  const char* name;
  bool two_shot;
  ArDType dtype;
  int sm;                             // compute capability of the cubin, e.g. 90 or 103
  void (*load)(int* cuda_error);
  int (*launch)(const AllReduceArgs& args, void* stream);  // returns a cudaError_t
};

extern const AllReduceKernelEntry kAllReduceKernels[];
extern const int kNumAllReduceKernels;

}  // namespace cutegrad
