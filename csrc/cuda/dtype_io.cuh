// Element types, vector packs and launch-error checks shared by the CUDA C++ kernels.
//
// Large tensors are stored as fp32, fp16 or bf16 and always computed in fp32. A "pack" is VEC elements
// that one thread moves with a single load or store (16 bytes on the fast path).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "../fastguide_abi.h"

namespace fastguide::cuda::detail {

// Storage traits: `Bits` is the raw element type in memory. Conversions to storage round to nearest even,
// as torch's `.to(dtype)` does. 16-bit types convert a 32-bit word (two elements) at a time, which keeps
// the register count of a pack at one register per word.
struct F32 {
  using Bits = float;
  static __device__ __forceinline__ float to_float(Bits b) { return b; }
  static __device__ __forceinline__ Bits from_float(float f) { return f; }
};

struct F16 {
  using Bits = uint16_t;
  static __device__ __forceinline__ float to_float(Bits b) { return __half2float(__ushort_as_half(b)); }
  static __device__ __forceinline__ Bits from_float(float f) { return __half_as_ushort(__float2half_rn(f)); }
  static __device__ __forceinline__ float word_half_to_float(uint32_t word, bool high) {
    return to_float(uint16_t(high ? word >> 16 : word & 0xffffu));
  }
  static __device__ __forceinline__ uint32_t floats_to_word(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return uint32_t(__half_as_ushort(h.x)) | (uint32_t(__half_as_ushort(h.y)) << 16);
  }
};

struct BF16 {
  using Bits = uint16_t;
  // bf16 is the top half of an fp32 word, so widening is a shift or a mask.
  static __device__ __forceinline__ float to_float(Bits b) { return __uint_as_float(uint32_t(b) << 16); }
  static __device__ __forceinline__ Bits from_float(float f) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
  }
  static __device__ __forceinline__ float word_half_to_float(uint32_t word, bool high) {
    return __uint_as_float(high ? word & 0xffff0000u : word << 16);
  }
  static __device__ __forceinline__ uint32_t floats_to_word(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return uint32_t(__bfloat16_as_ushort(h.x)) | (uint32_t(__bfloat16_as_ushort(h.y)) << 16);
  }
};

// Elements per 16-byte access.
template <class IO>
constexpr int kVec16 = int(16 / sizeof(typename IO::Bits));

// The raw bits of VEC consecutive elements, held as 32-bit words (a lone 16-bit element in the low half).
template <class IO, int VEC>
struct Pack {
  static constexpr int kBytes = int(sizeof(typename IO::Bits)) * VEC;
  static constexpr int kWords = kBytes >= 4 ? kBytes / 4 : 1;
  static_assert(kBytes == 16 || kBytes == 8 || kBytes == 4 || VEC == 1, "unsupported pack size");
  uint32_t w[kWords];
};

// Element j of a pack as fp32 (j is a compile-time constant after unrolling).
template <class IO, int VEC>
__device__ __forceinline__ float pack_get(const Pack<IO, VEC>& pack, int j) {
  if constexpr (sizeof(typename IO::Bits) == 4) {
    return __uint_as_float(pack.w[j]);
  } else if constexpr (VEC == 1) {
    return IO::to_float(uint16_t(pack.w[0]));
  } else {
    return IO::word_half_to_float(pack.w[j >> 1], (j & 1) != 0);
  }
}

// A pack holding `values` rounded to the storage type.
template <class IO, int VEC>
__device__ __forceinline__ Pack<IO, VEC> make_pack(const float (&values)[VEC]) {
  Pack<IO, VEC> pack;
  if constexpr (sizeof(typename IO::Bits) == 4) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) pack.w[j] = __float_as_uint(values[j]);
  } else if constexpr (VEC == 1) {
    pack.w[0] = IO::from_float(values[0]);
  } else {
#pragma unroll
    for (int k = 0; k < VEC / 2; ++k) pack.w[k] = IO::floats_to_word(values[2 * k], values[2 * k + 1]);
  }
  return pack;
}

// One load of a whole pack, as a single (vector) instruction.
template <class IO, int VEC>
__device__ __forceinline__ Pack<IO, VEC> load_pack(const typename IO::Bits* ptr) {
  using P = Pack<IO, VEC>;
  P pack;
  if constexpr (P::kBytes == 16) {
    const uint4 raw = *reinterpret_cast<const uint4*>(ptr);
    pack.w[0] = raw.x;
    pack.w[1] = raw.y;
    pack.w[2] = raw.z;
    pack.w[3] = raw.w;
  } else if constexpr (P::kBytes == 8) {
    const uint2 raw = *reinterpret_cast<const uint2*>(ptr);
    pack.w[0] = raw.x;
    pack.w[1] = raw.y;
  } else if constexpr (P::kBytes == 4) {
    pack.w[0] = *reinterpret_cast<const uint32_t*>(ptr);
  } else {
    pack.w[0] = *reinterpret_cast<const uint16_t*>(ptr);
  }
  return pack;
}

// One store of a whole pack. __stwb is an ordinary write-back store that is always emitted as one vector
// instruction (a plain uint4 assignment was seen split into four 4-byte stores).
template <class IO, int VEC>
__device__ __forceinline__ void store_pack(typename IO::Bits* ptr, const Pack<IO, VEC>& pack) {
  using P = Pack<IO, VEC>;
  if constexpr (P::kBytes == 16) {
    __stwb(reinterpret_cast<uint4*>(ptr), make_uint4(pack.w[0], pack.w[1], pack.w[2], pack.w[3]));
  } else if constexpr (P::kBytes == 8) {
    __stwb(reinterpret_cast<uint2*>(ptr), make_uint2(pack.w[0], pack.w[1]));
  } else if constexpr (P::kBytes == 4) {
    *reinterpret_cast<uint32_t*>(ptr) = pack.w[0];
  } else {
    *reinterpret_cast<uint16_t*>(ptr) = uint16_t(pack.w[0]);
  }
}

// Calls fn(IO{}) with the storage traits of `dtype`.
template <class Fn>
void dispatch_dtype(int32_t dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case kF32: fn(F32{}); return;
    case kF16: fn(F16{}); return;
    case kBF16: fn(BF16{}); return;
    default:
      throw std::runtime_error(std::string("fastguide.cuda.") + op + ": unsupported dtype code " +
                               std::to_string(dtype) + " (expected 0=float32, 1=float16, 2=bfloat16)");
  }
}

// True when a row-strided tensor can be moved in 16-byte packs: base aligned and every row start aligned.
// A null pointer (absent tensor) never blocks the fast path.
inline bool rows_aligned16(const void* base, int64_t row_stride, int64_t elem_size) {
  if (base == nullptr) return true;
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && (row_stride * elem_size) % 16 == 0;
}

inline void throw_on_error(cudaError_t err, const char* op) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fastguide.cuda.") + op + ": " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

// After a <<<>>> launch: a bad configuration is only reported through cudaGetLastError.
inline void check_launch(const char* op) { throw_on_error(cudaGetLastError(), op); }

inline cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

// Grid y is limited to 65535; kernels loop over the remaining rows.
inline unsigned grid_rows(int64_t rows) { return unsigned(rows < 65535 ? rows : 65535); }

}  // namespace fastguide::cuda::detail
