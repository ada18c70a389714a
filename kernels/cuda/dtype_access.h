// Device-side loads and stores of any cutegrad dtype through a compute type
// (float, double or int64_t), for the CUDA C++ kernels (nvcc only).
//
// Kernels read operands with a runtime dtype switch instead of being
// instantiated per dtype combination: the switch is uniform across a warp, so
// it costs a few instructions per element while keeping the number of
// compiled kernels at one per compute type.  Half types are widened to fp32
// on load and rounded once on store.
#pragma once
#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "ops_args.h"

namespace cutegrad {
namespace ops {

template <typename C>
__device__ __forceinline__ C load_as(const void* base, int dtype, int64_t off) {
  switch (dtype) {
    case kBool: return static_cast<C>(static_cast<const uint8_t*>(base)[off] != 0);
    case kU8: return static_cast<C>(static_cast<const uint8_t*>(base)[off]);
    case kI8: return static_cast<C>(static_cast<const int8_t*>(base)[off]);
    case kI16: return static_cast<C>(static_cast<const int16_t*>(base)[off]);
    case kI32: return static_cast<C>(static_cast<const int32_t*>(base)[off]);
    case kI64: return static_cast<C>(static_cast<const int64_t*>(base)[off]);
    case kF16: return static_cast<C>(__half2float(static_cast<const __half*>(base)[off]));
    case kBF16: return static_cast<C>(__bfloat162float(static_cast<const __nv_bfloat16*>(base)[off]));
    case kF32: return static_cast<C>(static_cast<const float*>(base)[off]);
    default: return static_cast<C>(static_cast<const double*>(base)[off]);
  }
}

// Float to integer goes through int64 so narrow integer results wrap as
// NumPy's casts do on x86, instead of hitting undefined narrowing conversions.
template <typename T, typename C>
__device__ __forceinline__ T to_int(C v) {
  if constexpr (std::is_floating_point<C>::value) {
    return static_cast<T>(static_cast<int64_t>(v));
  } else {
    return static_cast<T>(v);
  }
}

template <typename C>
__device__ __forceinline__ void store_from(void* base, int dtype, int64_t off, C v) {
  switch (dtype) {
    case kBool: static_cast<uint8_t*>(base)[off] = (v != C(0)) ? 1 : 0; break;
    case kU8: static_cast<uint8_t*>(base)[off] = to_int<uint8_t>(v); break;
    case kI8: static_cast<int8_t*>(base)[off] = to_int<int8_t>(v); break;
    case kI16: static_cast<int16_t*>(base)[off] = to_int<int16_t>(v); break;
    case kI32: static_cast<int32_t*>(base)[off] = to_int<int32_t>(v); break;
    case kI64: static_cast<int64_t*>(base)[off] = static_cast<int64_t>(v); break;
    // Doubles reach the 16-bit types through float, rounding twice, as PyTorch
    // (and ml_dtypes for bfloat16) do, so the three agree bit for bit.
    case kF16: static_cast<__half*>(base)[off] = __float2half_rn(static_cast<float>(v)); break;
    case kBF16: static_cast<__nv_bfloat16*>(base)[off] = __float2bfloat16_rn(static_cast<float>(v)); break;
    case kF32: static_cast<float*>(base)[off] = static_cast<float>(v); break;
    default: static_cast<double*>(base)[off] = static_cast<double>(v); break;
  }
}

// Statically typed element <-> float conversions for the kernels that are
// instantiated per dtype (vectorized elementwise, softmax, norms).
__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T narrow(float v);
template <> __device__ __forceinline__ float narrow<float>(float v) { return v; }
template <> __device__ __forceinline__ __half narrow<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename T> __device__ __forceinline__ T narrow(double v) { return static_cast<T>(v); }

// Accumulation type of a statically typed element: fp32 for halves and fp32, fp64 for fp64.
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// Math on the compute type: float calls the single-precision functions
// (never a silent promotion to double), double the double ones.
#define CUTEGRAD_MATH1(name, fname)                                                         \
  template <typename C> __device__ __forceinline__ C m_##name(C x) {                       \
    if constexpr (std::is_same<C, float>::value) return fname(x); else return ::name(x);   \
  }
CUTEGRAD_MATH1(exp, expf)
CUTEGRAD_MATH1(log, logf)
CUTEGRAD_MATH1(sqrt, sqrtf)
CUTEGRAD_MATH1(fabs, fabsf)
CUTEGRAD_MATH1(tanh, tanhf)
CUTEGRAD_MATH1(sin, sinf)
CUTEGRAD_MATH1(cos, cosf)
CUTEGRAD_MATH1(erf, erff)
CUTEGRAD_MATH1(log1p, log1pf)
CUTEGRAD_MATH1(expm1, expm1f)
CUTEGRAD_MATH1(floor, floorf)
CUTEGRAD_MATH1(ceil, ceilf)
CUTEGRAD_MATH1(rint, rintf)
CUTEGRAD_MATH1(trunc, truncf)
#undef CUTEGRAD_MATH1

template <typename C> __device__ __forceinline__ C m_pow(C a, C b) {
  if constexpr (std::is_same<C, float>::value) return powf(a, b); else return ::pow(a, b);
}
template <typename C> __device__ __forceinline__ C m_fmod(C a, C b) {
  if constexpr (std::is_same<C, float>::value) return fmodf(a, b); else return ::fmod(a, b);
}
template <typename C> __device__ __forceinline__ C m_atan2(C a, C b) {
  if constexpr (std::is_same<C, float>::value) return atan2f(a, b); else return ::atan2(a, b);
}
template <typename C> __device__ __forceinline__ C m_copysign(C a, C b) {
  if constexpr (std::is_same<C, float>::value) return copysignf(a, b); else return ::copysign(a, b);
}
template <typename C> __device__ __forceinline__ bool m_isnan(C x) {
  if constexpr (std::is_floating_point<C>::value) return x != x; else return false;
}
template <typename C> __device__ __forceinline__ C m_inf() {
  if constexpr (std::is_same<C, float>::value) return __int_as_float(0x7f800000);
  else return __longlong_as_double(0x7ff0000000000000LL);
}

}  // namespace ops
}  // namespace cutegrad
#endif  // __CUDACC__
