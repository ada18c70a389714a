// cutegrad._C: the one native module every GPU kernel is reached through.
//
// GEMM entry: validates everything it is given (shapes, dtypes, pointer
// alignment, strides) before any launch and raises a Python exception naming
// the mismatch, then picks the tensor-core CuTeDSL specialization that fits
// (kernels/cute/gemm.py, compiled ahead of time) or the SIMT fallback
// (kernels/cuda/gemm_fallback.cu).  The exported CuTeDSL modules are loaded on
// every device the first time any GEMM runs (or by load_kernels(), which a
// graph capture should call first: module loading must not happen mid-capture).
//
// Host cost per call is kept small: dtypes, epilogue and path arrive as
// integer codes, the device can be passed by the caller (no cudaGetDevice),
// per-device facts are read without a lock, the kernel is found by a direct
// index, and message strings are built only when something fails.  The TMA
// descriptors are not cached: the exported CuTeDSL wrapper
// (cute_dsl_<name>_wrapper) takes tensor structs and encodes its descriptors
// inside the generated host code on every call, with no entry point that
// accepts pre-encoded ones.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>
#include <nanobind/stl/optional.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "bindings.h"
#include "gemm_args.h"

namespace nb = nanobind;
using namespace cutegrad;

namespace {

using Triple = std::tuple<int64_t, int64_t, int64_t>;

// Integer codes at the Python boundary (cutegrad._gemm maps names to them):
// the hot path parses no strings.  Path codes:
enum class Path : int { automatic = 0, tensor_core = 1, simt = 2 };

const char* dtype_name(DType d) {
  switch (d) {
    case DType::bf16: return "bf16";
    case DType::fp16: return "fp16";
    case DType::fp32: return "fp32";
    case DType::tf32: return "tf32";
  }
  return "?";
}

int dtype_bytes(DType d) { return d == DType::fp32 || d == DType::tf32 ? 4 : 2; }

const char* epilogue_name(Epilogue e) {
  switch (e) {
    case Epilogue::none: return "none";
    case Epilogue::bias: return "bias";
    case Epilogue::gelu: return "gelu";
    case Epilogue::bias_gelu: return "bias_gelu";
    case Epilogue::gelu_bwd: return "gelu_bwd";
    case Epilogue::residual: return "residual";
    case Epilogue::bias_residual: return "bias_residual";
    case Epilogue::bias_gelu_aux: return "bias_gelu_aux";
  }
  return "?";
}

[[noreturn]] void fail(const std::string& msg) { throw nb::value_error(("gemm: " + msg).c_str()); }

DType to_dtype(int code, const char* what, bool tf32_allowed) {
  if (code < 0 || code > (tf32_allowed ? 3 : 2))
    throw nb::type_error((std::string("gemm: unsupported ") + what + " code " + std::to_string(code) +
                          (tf32_allowed ? " (expected 0 = bf16, 1 = fp16, 2 = fp32, 3 = tf32)"
                                        : " (expected 0 = bf16, 1 = fp16, 2 = fp32)")).c_str());
  return static_cast<DType>(code);
}

std::string triple_str(const Triple& t) {
  return "(" + std::to_string(std::get<0>(t)) + ", " + std::to_string(std::get<1>(t)) + ", " +
         std::to_string(std::get<2>(t)) + ")";
}

// Message strings are built only on failure.
void check_pointer(uintptr_t p, DType dt, const char* name, bool needed) {
  if (!needed) return;
  if (p == 0) fail(std::string(name) + " is a null pointer");
  if (p % dtype_bytes(dt) != 0) {
    char b[32];
    snprintf(b, sizeof b, "%llx", (unsigned long long)p);
    fail(std::string(name) + " pointer 0x" + b + " is not aligned to its element size (" +
         std::to_string(dtype_bytes(dt)) + " bytes)");
  }
}

// ---- module loading -------------------------------------------------------

std::once_flag g_load_once;
std::atomic<bool> g_loaded{false};
int g_load_error = 0;

void load_all_modules() {
  if (g_loaded.load(std::memory_order_acquire)) return;  // hot path: one atomic load
  std::call_once(g_load_once, [] {
    for (int i = 0; i < kNumGemmKernels; ++i) {
      int err = 0;
      kGemmKernels[i].load(&err);
      if (err != 0 && g_load_error == 0) g_load_error = err;
    }
    // Other kernel families (kernels/cuda/bindings.h) load their modules too.
    for (const Bindings::Entry& e : Bindings::all()) {
      int err = e.load ? e.load() : 0;
      if (err != 0 && g_load_error == 0) g_load_error = err;
    }
    if (g_load_error == 0) g_loaded.store(true, std::memory_order_release);
  });
  if (g_load_error != 0)
    throw std::runtime_error(std::string("cutegrad._C: loading the CuTeDSL kernel modules failed: ") +
                             cudaGetErrorString(static_cast<cudaError_t>(g_load_error)));
}

// Per-device facts, queried once per device.  Readers take no lock: a slot is
// published with a release store of `ready` after its fields are written.
struct DeviceInfo {
  int sm = -1;  // major*10 + minor
  int num_sms = 0;
};
constexpr int kMaxDevices = 64;
struct DeviceSlot {
  std::atomic<bool> ready{false};
  DeviceInfo info;
};
DeviceSlot g_devices[kMaxDevices];
std::mutex g_device_mu;  // only the first query of a device takes it

const DeviceInfo& device_info(int device) {
  if (device < 0 || device >= kMaxDevices) throw std::runtime_error("cutegrad._C: device index out of range");
  DeviceSlot& slot = g_devices[device];
  if (slot.ready.load(std::memory_order_acquire)) return slot.info;
  std::lock_guard<std::mutex> lock(g_device_mu);
  if (!slot.ready.load(std::memory_order_relaxed)) {
    int major = 0, minor = 0, sms = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      cudaGetLastError();
      throw std::runtime_error("cutegrad._C: cannot query CUDA device " + std::to_string(device));
    }
    slot.info.sm = major * 10 + minor;
    slot.info.num_sms = sms;
    slot.ready.store(true, std::memory_order_release);
  }
  return slot.info;
}

int current_device() {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("cutegrad._C: no usable CUDA device: ") + cudaGetErrorString(err));
  }
  return dev;
}

// ---- the table of AOT kernels, indexed once -----------------------------------
//
// A direct index over (arch, dtypes, layout, tile, epilogue, accumulate)
// replaces a scan of every entry per call.

constexpr int kTileSlots = 5;  // tile_n 128, 256 and the narrow 16, 32, 64
int tile_slot(int tile_n) {
  switch (tile_n) {
    case 128: return 0;
    case 256: return 1;
    case 16: return 2;
    case 32: return 3;
    case 64: return 4;
  }
  return -1;
}

int table_index(int sm_slot, DType in, DType out, char a_major, char b_major, int tile_n, Epilogue e, bool acc) {
  int i = sm_slot;
  i = i * 4 + static_cast<int>(in);
  i = i * 3 + static_cast<int>(out);
  i = i * 2 + (a_major == 'm');
  i = i * 2 + (b_major == 'n');
  i = i * kTileSlots + tile_slot(tile_n);
  i = i * kNumEpilogues + static_cast<int>(e);
  return i * 2 + acc;
}
constexpr int kTableSize = 1 * 4 * 3 * 2 * 2 * kTileSlots * kNumEpilogues * 2;

const std::array<const GemmKernelEntry*, kTableSize>& kernel_table() {
  static const std::array<const GemmKernelEntry*, kTableSize> table = [] {
    std::array<const GemmKernelEntry*, kTableSize> t{};
    for (int i = 0; i < kNumGemmKernels; ++i) {
      const GemmKernelEntry& e = kGemmKernels[i];
      if (e.sm != 90 || tile_slot(e.tile_n) < 0) continue;
      t[table_index(0, e.in_dtype, e.out_dtype, e.a_major, e.b_major, e.tile_n, e.epilogue, e.accumulate)] = &e;
    }
    return t;
  }();
  return table;
}

// ---- dispatch -------------------------------------------------------------

// Why the tensor-core path was not taken: a static reason, plus the details
// of "no specialization" formatted only when an error needs them.
enum class NoTensorCore {
  none, fp32_inputs, arch, alignment, bias_alignment, aux_alignment, extents, row_strides, batch_strides,
  aux_strides, no_specialization, too_small
};

const char* reason_text(NoTensorCore r) {
  switch (r) {
    case NoTensorCore::none: return "";
    case NoTensorCore::fp32_inputs: return "fp32 inputs run on tensor cores only as tf32 (the \"high\" precision)";
    case NoTensorCore::arch: return "the tensor-core GEMM is built for sm_90a only";
    case NoTensorCore::alignment: return "A, B and D must be 16-byte aligned";
    case NoTensorCore::bias_alignment: return "bias must be 16-byte aligned";
    case NoTensorCore::aux_alignment: return "aux must be 16-byte aligned";
    case NoTensorCore::extents: return "contiguous extents must be multiples of 16 bytes";
    case NoTensorCore::row_strides: return "row strides must be multiples of 16 bytes";
    case NoTensorCore::batch_strides: return "batch strides must be non-zero multiples of 16 bytes";
    case NoTensorCore::aux_strides: return "aux row and batch strides must be multiples of 16 bytes (bias_gelu_aux stores aux by TMA)";
    case NoTensorCore::no_specialization: return "no specialization";
    case NoTensorCore::too_small: return "too small";
  }
  return "?";
}

struct Choice {
  const GemmKernelEntry* kernel = nullptr;  // null: SIMT fallback
  NoTensorCore why_not = NoTensorCore::none;
};

bool divisible(int64_t v, int64_t by) { return v % by == 0; }

// Tile heuristic: N <= 64 (classifier heads) takes the narrowest tile that
// covers it.  Otherwise a 128x256 tile costs about 1.8 times a 128x128 one (it
// halves B traffic per FLOP), so count waves of each over the SMs and take
// the cheaper; this avoids e.g. 1.45 waves of 128x256 tiles at 8192x768.
int choose_tile_n(const GemmArgs& g, int num_sms) {
  if (g.n <= 16) return 16;
  if (g.n <= 32) return 32;
  if (g.n <= 64) return 64;
  if (g.n <= 128) return 128;
  const int64_t rows = (g.m + 127) / 128;
  const int64_t t128 = rows * ((g.n + 127) / 128) * g.batch, t256 = rows * ((g.n + 255) / 256) * g.batch;
  const double cost128 = static_cast<double>((t128 + num_sms - 1) / num_sms);
  const double cost256 = 1.8 * static_cast<double>((t256 + num_sms - 1) / num_sms);
  return cost256 < cost128 ? 256 : 128;
}

// Split plan for outputs with too few tiles to fill the SMs (weight gradients: small M x N,
// long K).  A pure function of the shape (tests call it through _C.gemm_split_plan):
//   * splits S > 1: the rows from dp_rows on run as S equal K-slices, a batch of fp32 partial
//     products in a workspace, summed in slice order 0..S-1 by one reduction kernel that also
//     applies the epilogue (deterministic: no atomics, the order never depends on timing);
//   * dp_rows (or dp_cols) > 0 with S > 1 (the wave tail): the first dp_rows rows (dp_cols
//     columns), whole 128-wide tiles filling whole waves, run unsplit first; only the remaining
//     tiles are split: the data-parallel + split-K hybrid of stream-K schedules, e.g. 144 tiles on
//     132 SMs run as one full wave plus 12 tiles split 8 ways (one more short wave) instead of
//     two full waves.  Rows or columns: whichever cut fills the waves better.
// Cost model in units of one 128x128 tile advancing one K element on one SM (~6.1 ns on an H100,
// measured): waves * K-slice length (rounded up to whole 64-wide K blocks), plus the partials'
// memory traffic and the extra launches.  The best plan must beat unsplit by 15%.  Slices must
// divide K, be >= 128 long and keep the TMA batch stride 16-byte aligned (k_align: 8 for a
// K-major 16-bit operand, 4 for K-major fp32/tf32, 1 otherwise; 0 for the SIMT path, which
// needs nothing, treated as 1).
struct SplitPlan {
  int64_t dp_rows = 0;
  int64_t dp_cols = 0;
  int splits = 1;
};

SplitPlan plan_split(int64_t m, int64_t n, int64_t k, int64_t batch, int num_sms, int64_t k_align) {
  SplitPlan plan;
  if (batch != 1 || k < 256 || m <= 0 || n <= 0 || num_sms <= 0) return plan;
  const double unit_s = 6.1e-9, bytes_per_s = 2.0e12, launch_s = 6e-6;
  const int64_t tiles_m = (m + 127) / 128, tiles_n = (n + 127) / 128, tiles = tiles_m * tiles_n;
  auto waves = [&](int64_t t) { return static_cast<double>((t + num_sms - 1) / num_sms); };
  auto k_len = [](int64_t len) { return static_cast<double>((len + 63) / 64 * 64); };
  auto reduce = [&](int64_t rows, int s) { return ((s * 4.0 + 4.0) * rows * n / bytes_per_s + launch_s) / unit_s; };
  // Unsplit: the better of 128x128 and 128x256 tiles (choose_tile_n's model).
  double unsplit = waves(tiles) * k_len(k);
  if (n > 128) unsplit = std::min(unsplit, 1.8 * waves(tiles_m * ((n + 255) / 256)) * k_len(k));
  // Rows (columns) that run unsplit in the hybrid: whole tile rows (columns) within whole waves.
  const int64_t full = tiles > num_sms ? (tiles / num_sms) * num_sms : 0;
  const int64_t dp_tile_rows = full / tiles_n, dp_tile_cols = full / tiles_m;
  double best_cost = unsplit * 0.85;
  const int64_t align = std::max<int64_t>(k_align, 1);
  for (int s = 2; s <= 32; ++s) {
    if (k % s != 0 || k / s < 128 || (k / s) % align != 0) continue;
    const double chunk = k_len(k / s);
    const double split_all = waves(tiles * s) * chunk + reduce(m, s);
    if (split_all < best_cost) best_cost = split_all, plan = SplitPlan{0, 0, s};
    // hybrid: dp_tiles whole tiles unsplit, tail_tiles (tail_elems outputs) split s ways
    auto hybrid = [&](int64_t dp_tiles, int64_t tail_tiles, int64_t tail_elems) {
      return waves(dp_tiles) * k_len(k) + waves(tail_tiles * s) * chunk +
             ((s * 4.0 + 4.0) * tail_elems / bytes_per_s + 2 * launch_s) / unit_s;
    };
    if (dp_tile_rows > 0 && dp_tile_rows < tiles_m) {
      const double c = hybrid(dp_tile_rows * tiles_n, (tiles_m - dp_tile_rows) * tiles_n, (m - dp_tile_rows * 128) * n);
      if (c < best_cost) best_cost = c, plan = SplitPlan{dp_tile_rows * 128, 0, s};
    }
    if (dp_tile_cols > 0 && dp_tile_cols < tiles_n) {
      const double c = hybrid(dp_tile_cols * tiles_m, (tiles_n - dp_tile_cols) * tiles_m, (n - dp_tile_cols * 128) * m);
      if (c < best_cost) best_cost = c, plan = SplitPlan{0, dp_tile_cols * 128, s};
    }
  }
  return plan;
}

Choice choose_kernel(const GemmArgs& g, char a_major, char b_major, int tile_n, const DeviceInfo& dev) {
  Choice c;
  auto no = [&](NoTensorCore why) { c.why_not = why; return c; };
  if (g.in_dtype == DType::fp32) return no(NoTensorCore::fp32_inputs);
  if (dev.sm != 90) return no(NoTensorCore::arch);
  const int vin = 16 / dtype_bytes(g.in_dtype), vout = 16 / dtype_bytes(g.out_dtype);
  auto aligned16 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (!aligned16(g.a) || !aligned16(g.b) || !aligned16(g.d)) return no(NoTensorCore::alignment);
  if (epilogue_adds_bias(g.epilogue) && !aligned16(g.bias)) return no(NoTensorCore::bias_alignment);
  if (epilogue_uses_aux(g.epilogue) && !aligned16(g.aux)) return no(NoTensorCore::aux_alignment);
  // TMA needs 16-byte row strides; we also keep every contiguous extent a
  // 16-byte multiple (the rule the CUTLASS Hopper examples state): on an H100
  // a D with N = 127 in a padded buffer had its padding overwritten.  Narrow
  // tiles (N <= 64) store D without TMA, so D's extent and strides are free.
  const bool d_by_tma = tile_n >= 128;
  if (!divisible(a_major == 'k' ? g.k : g.m, vin) || !divisible(b_major == 'k' ? g.k : g.n, vin) ||
      (d_by_tma && !divisible(g.n, vout)))
    return no(NoTensorCore::extents);
  int64_t a_ld = a_major == 'k' ? g.a_sm : g.a_sk;
  int64_t b_ld = b_major == 'k' ? g.b_sn : g.b_sk;
  if (!divisible(a_ld, vin) || !divisible(b_ld, vin) || (d_by_tma && !divisible(g.d_sm, vout)))
    return no(NoTensorCore::row_strides);
  if (g.batch > 1 && (!divisible(g.a_sl, vin) || !divisible(g.b_sl, vin) || (d_by_tma && !divisible(g.d_sl, vout)) ||
                      g.a_sl == 0 || g.b_sl == 0))
    return no(NoTensorCore::batch_strides);
  // bias_gelu_aux writes aux through a TMA store descriptor of its own, like D (its N is D's,
  // checked above; it has no narrow-tile specialization).
  if (g.epilogue == Epilogue::bias_gelu_aux &&
      (!divisible(g.aux_sm, vout) || (g.batch > 1 && !divisible(g.aux_sl, vout))))
    return no(NoTensorCore::aux_strides);
  c.kernel = kernel_table()[table_index(0, g.in_dtype, g.out_dtype, a_major, b_major, tile_n, g.epilogue, g.accumulate)];
  if (!c.kernel) c.why_not = NoTensorCore::no_specialization;
  return c;
}

std::string why_not_text(const Choice& c, const GemmArgs& g, char a_major, char b_major, int tile_n) {
  if (c.why_not != NoTensorCore::no_specialization) return reason_text(c.why_not);
  return std::string("no specialization for ") + dtype_name(g.in_dtype) + "->" + dtype_name(g.out_dtype) +
         " A " + a_major + "-major, B " + b_major + "-major, tile 128x" + std::to_string(tile_n) + ", epilogue " +
         epilogue_name(g.epilogue) + (g.accumulate ? " with accumulate" : "");
}

void check_cuda(int err, const char* what, const char* kernel) {
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("cutegrad._C: ") + what + kernel + " failed: " +
                             cudaGetErrorName(static_cast<cudaError_t>(err)) + ": " +
                             cudaGetErrorString(static_cast<cudaError_t>(err)));
  }
}

// One launch: the tensor-core specialization that fits, else the SIMT kernel.
// Returns the kernel's name (a static string).
const char* run_one(GemmArgs g, char a_major, char b_major, Path path, int tile_n, const DeviceInfo& dev, void* s) {
  Choice choice;
  if (path != Path::simt) {
    const bool big_enough = g.m >= 16 && g.n >= 16 && g.k >= 16;
    const int tn = tile_n ? tile_n : choose_tile_n(g, dev.num_sms);
    if (!big_enough && path == Path::automatic) {
      choice.why_not = NoTensorCore::too_small;
    } else {
      choice = choose_kernel(g, a_major, b_major, tn, dev);
      // Narrow tiles exist for the forward layout and plain / bias epilogues only, TF32 128x256
      // tiles for the plain and bias epilogues only: otherwise the 128x128 tile.
      if (!choice.kernel && tile_n == 0 && tn != 128 && choice.why_not == NoTensorCore::no_specialization)
        choice = choose_kernel(g, a_major, b_major, 128, dev);
    }
    if (!choice.kernel && path == Path::tensor_core)
      fail("tensor-core path requested but unavailable: " + why_not_text(choice, g, a_major, b_major, tn));
  }
  if (choice.kernel) {
    load_all_modules();
    // The exported kernels take a batch stride even for one batch; give them
    // a valid (16-byte multiple) one that is never used for addressing.
    if (g.batch == 1) {
      g.a_sl = (a_major == 'k' ? g.a_sm * g.m : g.a_sk * g.k);
      g.b_sl = (b_major == 'k' ? g.b_sn * g.n : g.b_sk * g.k);
      g.d_sl = g.d_sm * g.m;
      g.aux_sl = g.aux_sm * g.m;
    }
    check_cuda(choice.kernel->launch(g, s), "launch of ", choice.kernel->name);
    check_cuda(cudaGetLastError(), "launch of ", choice.kernel->name);
    return choice.kernel->name;
  }
  if (g.in_dtype == DType::tf32) g.in_dtype = DType::fp32;  // the SIMT kernel multiplies in full fp32
  check_cuda(gemm_fallback_launch(g, s), "launch of ", "gemm_simt");
  return "simt";
}

// Split-K workspace: from the Python caching allocator when one is registered
// (stream-ordered, capturable: a graph capture takes it from the graph's
// pool), else cudaMallocAsync for raw callers of _C.gemm.
// Never destroyed: a Python object must not be released after the
// interpreter has finalized.
nb::object& workspace_allocator() {
  static nb::object* fn = new nb::object();
  return *fn;
}

struct Workspace {
  void* ptr = nullptr;
  nb::object owner;  // the allocator's handle; dropping it frees the block on its stream
  cudaStream_t stream = nullptr;
  bool async_malloc = false;

  Workspace(size_t nbytes, int device, cudaStream_t s) : stream(s) {
    nb::object& fn = workspace_allocator();
    if (fn.is_valid() && !fn.is_none()) {
      nb::object res = fn(nbytes, device, reinterpret_cast<uintptr_t>(s));
      nb::tuple t = nb::cast<nb::tuple>(res);
      ptr = reinterpret_cast<void*>(nb::cast<uintptr_t>(t[0]));
      owner = t[1];
    } else {
      check_cuda(cudaMallocAsync(&ptr, nbytes, s), "split-K workspace allocation", "");
      async_malloc = true;
    }
  }
  ~Workspace() {
    if (async_malloc) cudaFreeAsync(ptr, stream);
  }
};

// Returns the name of the kernel that ran ("simt" for the fallback).
std::string gemm(uintptr_t a, Triple a_shape, Triple a_strides, uintptr_t b, Triple b_shape, Triple b_strides,
                 uintptr_t d, Triple d_shape, Triple d_strides, int dtype, int out_dtype, int epilogue,
                 uintptr_t bias, uintptr_t aux, std::optional<Triple> aux_strides, bool accumulate,
                 uintptr_t stream, int path_code, int tile_n, int split_k, int device) {
  GemmArgs g{};
  g.in_dtype = to_dtype(dtype, "dtype", true);
  g.out_dtype = to_dtype(out_dtype, "out_dtype", false);
  if (g.in_dtype == DType::tf32 && g.out_dtype != DType::fp32) fail("tf32 operands need out_dtype fp32");
  if (epilogue < 0 || epilogue >= kNumEpilogues)
    fail("unknown epilogue code " + std::to_string(epilogue) + " (expected 0.." + std::to_string(kNumEpilogues - 1) + ")");
  g.epilogue = static_cast<Epilogue>(epilogue);
  g.accumulate = accumulate;
  if (path_code < 0 || path_code > 2)
    fail("path code must be 0 (auto), 1 (tensor_core) or 2 (simt), got " + std::to_string(path_code));
  const Path path = static_cast<Path>(path_code);
  if (tile_n != 0 && tile_slot(tile_n) < 0) fail("tile_n must be 0 (heuristic), 16, 32, 64, 128 or 256");
  if (split_k < 0 || split_k > 64) fail("split_k must be 0 (heuristic), 1 (off) or 2..64");

  auto [la, m, ka] = a_shape;
  auto [lb, kb, n] = b_shape;
  auto [ld_, md, nd] = d_shape;
  if (ka != kb) fail("K mismatch: A is " + triple_str(a_shape) + " (batch, M, K) but B is " + triple_str(b_shape) + " (batch, K, N)");
  if (md != m || nd != n)
    fail("D shape " + triple_str(d_shape) + " does not match (batch, M, N) = (" + std::to_string(la) + ", " +
         std::to_string(m) + ", " + std::to_string(n) + ")");
  if (la != lb || la != ld_)
    fail("batch mismatch: A " + std::to_string(la) + ", B " + std::to_string(lb) + ", D " + std::to_string(ld_));
  if (m < 0 || n < 0 || ka < 0 || la < 1) fail("extents must be non-negative and batch >= 1");
  const int64_t int32_max = 2147483647;
  if (m > int32_max || n > int32_max || ka > int32_max || la > 65535) fail("extent too large (M, N, K < 2^31, batch <= 65535)");
  g.m = m; g.n = n; g.k = ka; g.batch = la;
  std::tie(g.a_sl, g.a_sm, g.a_sk) = a_strides;
  std::tie(g.b_sl, g.b_sk, g.b_sn) = b_strides;
  int64_t d_sn;
  std::tie(g.d_sl, g.d_sm, d_sn) = d_strides;

  const bool uses_aux = epilogue_uses_aux(g.epilogue);
  if (g.m == 0 || g.n == 0) return "none";
  const bool nonempty_k = g.k > 0;
  check_pointer(a, g.in_dtype, "A", nonempty_k);
  check_pointer(b, g.in_dtype, "B", nonempty_k);
  check_pointer(d, g.out_dtype, "D", true);
  check_pointer(bias, g.out_dtype, "bias", epilogue_adds_bias(g.epilogue));
  check_pointer(aux, g.out_dtype, g.epilogue == Epilogue::gelu_bwd ? "aux (pre-activation)" : "aux", uses_aux);

  // A dimension of extent 1 has no meaningful stride: treat it as unit so a
  // row or column vector is accepted in either major order.
  if (g.m == 1 && g.a_sk != 1) g.a_sm = 1;
  if (g.k == 1) { if (g.a_sm != 1) g.a_sk = 1; if (g.b_sn != 1) g.b_sk = 1; }
  if (g.n == 1 && g.b_sk != 1) g.b_sn = 1;
  if (g.n == 1) d_sn = 1;
  char a_major, b_major;
  if (g.a_sk == 1) a_major = 'k';
  else if (g.a_sm == 1) a_major = 'm';
  else fail("A has no unit stride (strides (batch, M, K) = " + triple_str(a_strides) + "): its inner dimension must be contiguous");
  if (g.b_sk == 1) b_major = 'k';
  else if (g.b_sn == 1) b_major = 'n';
  else fail("B has no unit stride (strides (batch, K, N) = " + triple_str(b_strides) + "): its inner dimension must be contiguous");
  if (d_sn != 1) fail("D must have unit stride along N (strides (batch, M, N) = " + triple_str(d_strides) + ")");
  if (g.d_sm < g.n && g.m > 1) fail("D rows overlap: row stride " + std::to_string(g.d_sm) + " < N = " + std::to_string(g.n));
  if (g.batch > 1 && g.d_sl == 0) fail("D batch stride is 0 with batch > 1: outputs would overlap");
  if (uses_aux) {
    if (!aux_strides) fail(std::string("epilogue ") + epilogue_name(g.epilogue) + " needs aux_strides (batch, M, N)");
    int64_t aux_sn;
    std::tie(g.aux_sl, g.aux_sm, aux_sn) = *aux_strides;
    if (aux_sn != 1 && g.n > 1) fail("aux must have unit stride along N (strides " + triple_str(*aux_strides) + ")");
    if (g.epilogue == Epilogue::bias_gelu_aux && g.aux_sm < g.n && g.m > 1)
      fail("aux rows overlap: row stride " + std::to_string(g.aux_sm) + " < N = " + std::to_string(g.n));
    if (g.epilogue == Epilogue::bias_gelu_aux && g.batch > 1 && g.aux_sl == 0)
      fail("aux batch stride is 0 with batch > 1: the stored pre-activations would overlap");
    // Two asynchronous TMA stores to the same address have no defined order.
    if (g.epilogue == Epilogue::bias_gelu_aux && aux == d) fail("aux and D are the same memory: bias_gelu_aux writes both");
  }
  g.a = reinterpret_cast<const void*>(a);
  g.b = reinterpret_cast<const void*>(b);
  g.d = reinterpret_cast<void*>(d);
  g.bias = reinterpret_cast<const void*>(bias);
  g.aux = reinterpret_cast<const void*>(aux);

  if (split_k > 1 && (g.batch != 1 || g.k % split_k != 0))
    fail("split_k=" + std::to_string(split_k) + " needs batch 1 and K (" + std::to_string(g.k) + ") divisible by it");

  if (device < 0) device = current_device();
  const DeviceInfo& dev = device_info(device);
  g.max_ctas = dev.num_sms;
  void* s = reinterpret_cast<void*>(stream);

  SplitPlan plan;
  if (split_k > 1) {
    plan.splits = split_k;
  } else if (split_k == 0 && path != Path::simt && g.batch == 1 && g.k >= 256) {
    GemmArgs probe = g;  // what the partial-product GEMM would look like
    probe.out_dtype = DType::fp32;
    probe.epilogue = Epilogue::none;
    probe.accumulate = false;
    probe.d = nullptr;
    probe.d_sm = (g.n + 7) / 8 * 8;
    const bool tensor_core = choose_kernel(probe, a_major, b_major, 128, dev).kernel != nullptr;
    const int64_t k_align = !tensor_core ? 1 : (a_major == 'k' || b_major == 'k') ? 16 / dtype_bytes(g.in_dtype) : 1;
    plan = plan_split(g.m, g.n, g.k, g.batch, dev.num_sms, k_align);
  }
  if (plan.splits == 1) return run_one(g, a_major, b_major, path, tile_n, dev, s);

  std::string dp_name;
  if (plan.dp_rows > 0 || plan.dp_cols > 0) {
    // The hybrid's whole waves: the leading rows (columns) unsplit on 128x128 tiles (the plan's
    // model), then the tail as a GEMM of its own (operand, output, bias and aux pointers moved).
    GemmArgs head = g;
    if (plan.dp_rows > 0) head.m = plan.dp_rows;
    else head.n = plan.dp_cols;
    dp_name = std::string(run_one(head, a_major, b_major, path, tile_n ? tile_n : 128, dev, s)) + "+";
    const int in_b = dtype_bytes(g.in_dtype), out_b = dtype_bytes(g.out_dtype);
    if (plan.dp_rows > 0) {
      g.a = static_cast<const char*>(g.a) + plan.dp_rows * g.a_sm * in_b;
      g.d = static_cast<char*>(g.d) + plan.dp_rows * g.d_sm * out_b;
      if (uses_aux) g.aux = static_cast<const char*>(g.aux) + plan.dp_rows * g.aux_sm * out_b;
      g.m -= plan.dp_rows;
    } else {
      g.b = static_cast<const char*>(g.b) + plan.dp_cols * g.b_sn * in_b;
      g.d = static_cast<char*>(g.d) + plan.dp_cols * out_b;
      if (epilogue_adds_bias(g.epilogue)) g.bias = static_cast<const char*>(g.bias) + plan.dp_cols * out_b;
      if (uses_aux) g.aux = static_cast<const char*>(g.aux) + plan.dp_cols * out_b;
      g.n -= plan.dp_cols;
    }
  }
  const int splits = plan.splits;
  // K-slices as a batch of fp32 partial products, then reduce (slice order 0..S-1) + epilogue.
  const int64_t ws_ld = (g.n + 7) / 8 * 8;
  Workspace ws(static_cast<size_t>(splits) * g.m * ws_ld * sizeof(float), device, static_cast<cudaStream_t>(s));
  GemmArgs part = g;
  const int64_t chunk = g.k / splits;
  part.k = chunk;
  part.batch = splits;
  part.a_sl = chunk * g.a_sk;
  part.b_sl = chunk * g.b_sk;
  part.d = ws.ptr;
  part.d_sm = ws_ld;
  part.d_sl = ws_ld * g.m;
  part.out_dtype = DType::fp32;
  part.epilogue = Epilogue::none;
  part.accumulate = false;
  part.bias = part.aux = nullptr;
  const char* name = run_one(part, a_major, b_major, path, tile_n, dev, s);
  check_cuda(gemm_splitk_reduce(g, static_cast<const float*>(ws.ptr), ws_ld, splits, s), "launch of ",
             "gemm_splitk_reduce");
  return dp_name + "splitk" + std::to_string(splits) + ":" + name + "+reduce";
}

nb::list gemm_specializations() {
  nb::list out;
  for (int i = 0; i < kNumGemmKernels; ++i) {
    const GemmKernelEntry& e = kGemmKernels[i];
    nb::dict d;
    d["name"] = e.name;
    d["dtype"] = dtype_name(e.in_dtype);
    d["out_dtype"] = dtype_name(e.out_dtype);
    d["a_major"] = std::string(1, e.a_major);
    d["b_major"] = std::string(1, e.b_major);
    d["tile_m"] = e.tile_m;
    d["tile_n"] = e.tile_n;
    d["epilogue"] = epilogue_name(e.epilogue);
    d["accumulate"] = e.accumulate;
    d["sm"] = e.sm;
    out.append(d);
  }
  return out;
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "cutegrad native kernels (AOT CuTeDSL + CUDA C++)";
  m.def("gemm", &gemm, nb::arg("a"), nb::arg("a_shape"), nb::arg("a_strides"), nb::arg("b"), nb::arg("b_shape"),
        nb::arg("b_strides"), nb::arg("d"), nb::arg("d_shape"), nb::arg("d_strides"), nb::arg("dtype"),
        nb::arg("out_dtype"), nb::arg("epilogue") = 0, nb::arg("bias") = 0, nb::arg("aux") = 0,
        nb::arg("aux_strides") = nb::none(), nb::arg("accumulate") = false, nb::arg("stream") = 0,
        nb::arg("path") = 0, nb::arg("tile_n") = 0, nb::arg("split_k") = 0, nb::arg("device") = -1,
        "D = epilogue(A @ B (+ D)) on raw device pointers, dtype/epilogue/path as integer codes "
        "(cutegrad._gemm maps names); see docs/kernels.md. Returns the kernel's name.");
  m.def(
      "set_gemm_workspace_allocator",
      [](nb::object fn) { workspace_allocator() = std::move(fn); },
      nb::arg("fn").none(),
      "fn(nbytes, device, stream) -> (address, owner): split-K workspaces come from it (owner dropped after the "
      "launches frees the block on that stream); None restores cudaMallocAsync.");
  m.def(
      "gemm_split_plan",
      [](int64_t m, int64_t n, int64_t k, int64_t batch, int num_sms, int64_t k_align) {
        SplitPlan p = plan_split(m, n, k, batch, num_sms, k_align);
        return std::make_tuple(p.dp_rows, p.dp_cols, p.splits);
      },
      nb::arg("m"), nb::arg("n"), nb::arg("k"), nb::arg("batch"), nb::arg("num_sms"), nb::arg("k_align"),
      "(dp_rows, dp_cols, splits) the heuristic picks for D = A @ B (M x N, K long) on num_sms SMs: the first "
      "dp_rows rows (dp_cols columns) unsplit, the rest in `splits` K-slices (k_align: the slice-length multiple the tensor-core path needs). "
      "Pure function of its arguments; needs no GPU.");
  m.def("gemm_specializations", &gemm_specializations, "The AOT CuTeDSL GEMM specializations built into this module.");
  for (const Bindings::Entry& e : Bindings::all()) e.add(m);
  m.def(
      "load_kernels",
      [] {
        load_all_modules();
        return kNumGemmKernels;
      },
      "Load every exported CuTeDSL module on every device (call before a CUDA graph capture).");
}
