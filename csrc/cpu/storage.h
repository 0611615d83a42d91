// fp32 <-> fp16 / bf16 storage conversion (no libtorch) and tile load/store helpers.
//
// The conversions are branch-free selects so that the loops around them vectorise (this needs
// -fno-trapping-math, set in CMakeLists.txt). Rounding is to nearest even, as in PyTorch's casts.
#pragma once
#include <cstdint>
#include <cstring>

#include "../fastguide_abi.h"
#include "fastguide_cpu.h"

namespace fastguide::cpu {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t magnitude = uint32_t(h & 0x7fffu) << 13;  // exponent + mantissa at their fp32 positions
  const uint32_t exponent = h & 0x7c00u;
  // Normal numbers: rebias the exponent from 15 to 127; Inf/NaN: exponent field becomes all ones.
  uint32_t bits = exponent == 0x7c00u ? magnitude + (224u << 23) : magnitude + (112u << 23);
  // Zero and subnormals: mantissa * 2^-24, exact in fp32.
  const float subnormal = float(int32_t(h & 0x3ffu)) * 0x1p-24f;
  bits = exponent == 0 ? float_bits(subnormal) : bits;
  return bits_float(bits | sign);
}

inline uint16_t float_to_half(float f) {
  const uint32_t bits = float_bits(f);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t mag = bits & 0x7fffffffu;
  // Normal range: rebias, then round the 13 dropped mantissa bits to nearest even. A carry out of the
  // mantissa correctly bumps the exponent (up to Inf for values >= 65520).
  const uint32_t normal = (mag - (112u << 23) + 0xfffu + ((mag >> 13) & 1u)) >> 13;
  // Below 2^-14 the result is subnormal: adding 0.5 makes the fp32 adder round at the fp16 step 2^-24.
  const uint32_t subnormal = float_bits(bits_float(mag) + 0.5f) - float_bits(0.5f);
  uint32_t h = mag < 0x38800000u ? subnormal : normal;
  h = mag >= 0x47800000u ? 0x7c00u : h;  // |f| >= 65536 (and Inf): Inf
  h = mag > 0x7f800000u ? 0x7e00u : h;   // NaN: quiet NaN
  return uint16_t(h | sign);
}

inline float bf16_to_float(uint16_t h) { return bits_float(uint32_t(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  const uint32_t bits = float_bits(f);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (bits >> 16) | 0x40u;
  return uint16_t((bits & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

// fp16 with F16C and bf16 stores with AVX2 (storage_avx2.cpp), eight values per instruction, on x86-64 CPUs
// that have both: with the portable selects above an fp16 kernel took 10-13x an fp32 one's time and a bf16
// kernel 2.7-3.8x, with these 1.8-1.9x and 2.1-2.2x (benchmarks/step_cpu_dtypes.py; bf16's loads, a shift,
// vectorise as they are). Chosen once per process; FASTGUIDE_PORTABLE_CONVERSIONS=1 keeps the portable loops
// (the tests run both). Results are the same bit for bit, except an fp16 NaN's payload (the hardware keeps it
// quieted, the portable loop writes 0x7e00).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTGUIDE_AVX2_CONVERSIONS 1
void half_to_float_f16c(const uint16_t* src, float* dst, int64_t len);
void float_to_half_f16c(const float* src, uint16_t* dst, int64_t len);
void float_to_bf16_avx2(const float* src, uint16_t* dst, int64_t len);
#endif

// `len` values of a `dtype` array starting at element `offset`, as fp32: the data itself when it is fp32,
// else converted into `buf`.
inline const float* load_f32(int32_t dtype, const void* base, int64_t offset, int64_t len,
                             float* __restrict buf) {
  if (dtype == kF32) return static_cast<const float*>(base) + offset;
  const uint16_t* __restrict src = static_cast<const uint16_t*>(base) + offset;
#ifdef FASTGUIDE_AVX2_CONVERSIONS
  if (dtype == kF16 && avx2_conversions()) {
    half_to_float_f16c(src, buf, len);
    return buf;
  }
#endif
  if (dtype == kF16) {
    for (int64_t i = 0; i < len; ++i) buf[i] = half_to_float(src[i]);
  } else {
    for (int64_t i = 0; i < len; ++i) buf[i] = bf16_to_float(src[i]);
  }
  return buf;
}

// Stores `len` fp32 values into a `dtype` array at element `offset`, rounding to nearest even.
inline void store_f32(int32_t dtype, void* base, int64_t offset, const float* __restrict src, int64_t len) {
  if (dtype == kF32) {
    std::memcpy(static_cast<float*>(base) + offset, src, size_t(len) * sizeof(float));
    return;
  }
  uint16_t* __restrict dst = static_cast<uint16_t*>(base) + offset;
#ifdef FASTGUIDE_AVX2_CONVERSIONS
  if (avx2_conversions()) {
    (dtype == kF16 ? float_to_half_f16c : float_to_bf16_avx2)(src, dst, len);
    return;
  }
#endif
  if (dtype == kF16) {
    for (int64_t i = 0; i < len; ++i) dst[i] = float_to_half(src[i]);
  } else {
    for (int64_t i = 0; i < len; ++i) dst[i] = float_to_bf16(src[i]);
  }
}

}  // namespace fastguide::cpu
