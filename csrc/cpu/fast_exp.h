// A vectorisable fp32 exp (std::exp is a library call the compiler cannot vectorise portably).
#pragma once
#include <cstdint>

#include "storage.h"

namespace fastguide::cpu {

// exp(x) with a relative error below 2e-7 for x in [-87.3, 88]; 0 below that range (where the true value
// is subnormal, < 1.2e-38), NaN for NaN. Inputs above 88 are clamped (the kernels only take exp of
// log-variances and of non-positive shifted logits).
inline float exp_f32(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693145751953125f;      // ln 2 split so that k * kLn2Hi is exact
  constexpr float kLn2Lo = 1.428606765330187045e-6f;
  constexpr float kRoundMagic = 12582912.f;          // 1.5 * 2^23: adding it rounds to an integer
  constexpr float kMin = -87.3365447f, kMax = 88.f;      // keeps 2^k a normal fp32 number
  float clamped = x > kMin ? x : kMin;                   // NaN maps to kMin here, restored below
  clamped = clamped < kMax ? clamped : kMax;
  const float k = (clamped * kLog2e + kRoundMagic) - kRoundMagic;  // nearest integer to x / ln 2
  const float r = (clamped - k * kLn2Hi) - k * kLn2Lo;             // |r| <= ln(2)/2
  // Taylor polynomial of exp(r), degree 7 (truncation error < 5e-9 relative on |r| <= 0.347).
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const float two_k = bits_float(uint32_t(int32_t(k) + 127) << 23);
  const float y = x < kMin ? 0.f : p * two_k;
  return x == x ? y : x;
}

}  // namespace fastguide::cpu
