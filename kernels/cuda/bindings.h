// How a kernel family adds itself to cutegrad._C without editing module.cpp.
//
// Each binding file (kernels/cuda/*.cpp) defines, at namespace scope,
//   static cutegrad::Bindings reg(&add_my_functions, &load_my_modules);
// module.cpp calls every registered `add` while building the module, and every
// `load` (may be null) from load_kernels(), which must run before a CUDA graph
// capture: loading a CuTeDSL module is illegal mid-capture.  A `load` returns 0
// or the first cudaError_t it met.  The registry is a function-local static,
// so the order in which translation units initialise does not matter.
#pragma once
#include <nanobind/nanobind.h>

#include <vector>

namespace cutegrad {

struct Bindings {
  using AddFn = void (*)(nanobind::module_&);
  using LoadFn = int (*)();
  Bindings(AddFn add, LoadFn load) { all().push_back({add, load}); }

  struct Entry {
    AddFn add;
    LoadFn load;
  };
  static std::vector<Entry>& all() {
    static std::vector<Entry> entries;
    return entries;
  }
};

}  // namespace cutegrad
