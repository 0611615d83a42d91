// fp16 <-> fp32 conversions with F16C and fp32 -> bf16 with AVX2 (declared in storage.h), eight values per
// instruction.
//
// Compiled for those features function by function and called only after a runtime check of the CPU, so
// the extension still loads everywhere. Each loop's tail (len % 8) takes the portable scalar conversion,
// which rounds identically.
#include "fastguide_cpu.h"
#include "storage.h"

#ifdef FASTGUIDE_AVX2_CONVERSIONS
#include <immintrin.h>

#include <cstdlib>
#include <cstring>

namespace fastguide::cpu {

__attribute__((target("avx2,f16c"))) void half_to_float_f16c(const uint16_t* src, float* dst, int64_t len) {
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {  // (two independent loads per iteration keep more of them in flight)
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm256_castsi256_si128(h)));  // exact, subnormals included
    _mm256_storeu_ps(dst + i + 8, _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)));
  }
  for (; i + 8 <= len; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  for (; i < len; ++i) dst[i] = half_to_float(src[i]);
}

__attribute__((target("avx2,f16c"))) void float_to_half_f16c(const float* src, uint16_t* dst, int64_t len) {
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    // Round to nearest even from the immediate (not MXCSR), as the portable conversion and torch do.
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  for (; i < len; ++i) dst[i] = float_to_half(src[i]);
}

// float_to_bf16 eight lanes at a time: (bits + 0x7fff + lsb) >> 16, a NaN kept quiet as (bits >> 16) | 0x40.
__attribute__((target("avx2"))) void float_to_bf16_avx2(const float* src, uint16_t* dst, int64_t len) {
  const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7fff);
  const __m256i magnitude = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
  const __m256i quiet = _mm256_set1_epi32(0x40);
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    const __m256i bits = _mm256_castps_si256(_mm256_loadu_ps(src + i));
    const __m256i high = _mm256_srli_epi32(bits, 16);
    const __m256i rounded =
        _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, bias), _mm256_and_si256(high, one)), 16);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(bits, magnitude), inf);  // (both operands >= 0)
    const __m256i r = _mm256_blendv_epi8(rounded, _mm256_or_si256(high, quiet), nan);
    // Every lane holds a value <= 0xffff, so the saturating pack is exact.
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
  }
  for (; i < len; ++i) dst[i] = float_to_bf16(src[i]);
}

}  // namespace fastguide::cpu
#endif

namespace fastguide::cpu {

bool avx2_conversions() {
#ifdef FASTGUIDE_AVX2_CONVERSIONS
  static const bool enabled = [] {
    const char* portable = std::getenv("FASTGUIDE_PORTABLE_CONVERSIONS");
    if (portable && *portable && std::strcmp(portable, "0") != 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");  // (the loops use AVX2 registers)
  }();
  return enabled;
#else
  return false;
#endif
}

}  // namespace fastguide::cpu
