// Host emulation of the parts of CUDA's cuda_fp16.h that csrc/cuda uses (see cuda_runtime.h). Conversions
// go through the compiler's _Float16 (IEEE binary16, round to nearest even, subnormals and overflow to Inf
// as on the GPU and in torch); arithmetic on __half is not emulated.
#pragma once
#include "cuda_runtime.h"

#if !defined(__FLT16_MANT_DIG__)
#error "the CUDA emulation needs a compiler with _Float16 (g++ >= 12 on x86-64 or aarch64)"
#endif

struct alignas(2) __half {
  unsigned short __x;
};
struct alignas(4) __half2 {
  __half x, y;
};

inline __half __ushort_as_half(unsigned short bits) { return __half{bits}; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.__x, 2);
  return float(f);
}
inline __half __float2half_rn(float x) {
  const _Float16 f = static_cast<_Float16>(x);
  __half h;
  std::memcpy(&h.__x, &f, 2);
  return h;
}
inline __half2 __floats2half2_rn(float lo, float hi) { return __half2{__float2half_rn(lo), __float2half_rn(hi)}; }
inline __half2 __float2half2_rn(float x) { return __floats2half2_rn(x, x); }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
